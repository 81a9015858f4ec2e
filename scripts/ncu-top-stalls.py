#!/usr/bin/env python3
"""The SASS lines where a kernel's warps were sampled most, from ncu's source page
(`ncu -i REPORT --page source --print-source sass --csv`, the SourceCounters section).

The sample column is the first whose name holds "All Samples" (ncu's "Warp Stall Sampling (All
Samples)"), else the first holding "Sampl". Prints the total, then the N lines with the most
samples: samples, share of the total, address, instruction, and the three largest other
numeric columns of that line by name; then every HGMMA line (address, times executed,
samples), so that each wgmma loop's share of the work shows (a loop's HGMMAs run once per
k-block and warp). Exits 1 when the file has no such column or no samples.

Usage: ncu-top-stalls.py SOURCE.csv [N]   (N: 40)
"""
import csv
import sys


def number(text):
    """The value of a cell ("1,234", "12.5"), or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read(path):
    """(header, rows) of the CSV's first table whose header names a sample column."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    for i, row in enumerate(rows):
        if any("Sampl" in cell for cell in row):
            width = len(row)
            return row, [r for r in rows[i + 1:] if len(r) == width]
    return None, []


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    header, rows = read(sys.argv[1])
    if header is None:
        print("ncu-top-stalls: no sample column in", sys.argv[1])
        return 1
    samples = next((i for i, h in enumerate(header) if "All Samples" in h), None)
    if samples is None:
        samples = next(i for i, h in enumerate(header) if "Sampl" in h)
    address = next((i for i, h in enumerate(header) if "Address" in h), None)
    source = next((i for i, h in enumerate(header) if h.strip() == "Source"), None)
    lines = [(number(r[samples]) or 0.0, r) for r in rows]
    total = sum(s for s, _ in lines)
    if total <= 0:
        print("ncu-top-stalls: no samples in", sys.argv[1])
        return 1
    print(f"{header[samples]}: {total:.0f} in {len(rows)} lines")
    lines.sort(key=lambda x: -x[0])
    for s, r in lines[:top]:
        others = []
        for i, cell in enumerate(r):
            v = number(cell)
            if i not in (samples, address) and v is not None and v > 0:
                others.append((v, header[i]))
        others.sort(reverse=True)
        where = r[address] if address is not None else "?"
        text = r[source] if source is not None else ""
        extra = "; ".join(f"{name} {v:.0f}" for v, name in others[:3])
        print(f"{s:10.0f} {100 * s / total:5.1f}%  {where:>8}  {text[:70]:70}  {extra}")
    executed = next((i for i, h in enumerate(header) if h.strip() == "Instructions Executed"),
                    None)
    print("HGMMA lines: address, instructions executed, samples")
    for s, r in sorted(lines, key=lambda x: x[1][address] if address is not None else ""):
        if source is not None and "HGMMA" in r[source]:
            n = number(r[executed]) if executed is not None else None
            where = r[address] if address is not None else "?"
            print(f"  {where:>8}  {'?' if n is None else f'{n:.0f}':>12}  {s:10.0f}  {r[source][:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
