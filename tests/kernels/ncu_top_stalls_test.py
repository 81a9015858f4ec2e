#!/usr/bin/env python3
"""scripts/ncu-top-stalls.py on hand-written CSV in the shape of ncu's source page: the lines
come out by samples, with thousands separators read, shares of the total, and the other
counters named, then the HGMMA lines with their execution counts; a file without a sample column or without samples fails.
Usage: ncu_top_stalls_test.py NCU_TOP_STALLS TMPDIR"""
import os
import subprocess
import sys


def run(script, tmp, name, text):
    path = os.path.join(tmp, name + ".csv")
    with open(path, "w") as f:
        f.write(text)
    out = subprocess.run([sys.executable, script, path, "2"], capture_output=True, text=True)
    return out.returncode, out.stdout


def main():
    script, tmp = sys.argv[1], sys.argv[2]
    os.makedirs(tmp, exist_ok=True)
    failures = []
    page = (
        '"Kernel Name","megakernel_step"\n'
        '"# Address","Source","Warp Stall Sampling (All Samples)",'
        '"Warp Stall Sampling (Not-issued Samples)","Instructions Executed"\n'
        '"0x10","LDL R2, [R1+0x10]","1,500","1,400","64"\n'
        '"0x20","HGMMA.64x256x16.F32.BF16 R24, gdesc[UR20], R24, gsb0","6,000","5,900","256"\n'
        '"0x30","IADD3 R4, R4, 0x1, RZ","500","100","2,048"\n'
    )
    rc, out = run(script, tmp, "page", page)
    lines = out.splitlines()
    if rc != 0:
        failures.append(f"page: rc {rc}")
    if not lines or "8000 in 3 lines" not in lines[0]:
        failures.append(f"page: total line {lines[:1]}")
    if len(lines) != 5:
        failures.append(f"page: want the total, 2 lines and 2 of HGMMAs, got {len(lines)}")
    else:
        if "HGMMA lines" not in lines[3]:
            failures.append(f"page: HGMMA header {lines[3]!r}")
        if lines[4].split()[:3] != ["0x20", "256", "6000"]:
            failures.append(f"page: HGMMA line {lines[4]!r}")
        if "HGMMA" not in lines[1] or "75.0%" not in lines[1] or "5900" not in lines[1]:
            failures.append(f"page: first line {lines[1]!r}")
        if "LDL" not in lines[2] or "18.8%" not in lines[2] or "0x10" not in lines[2]:
            failures.append(f"page: second line {lines[2]!r}")
    rc, out = run(script, tmp, "no_column", '"# Address","Source"\n"0x10","EXIT"\n')
    if rc != 1:
        failures.append(f"no sample column: rc {rc}, {out!r}")
    rc, out = run(script, tmp, "no_samples",
                  '"# Address","Source","Warp Stall Sampling (All Samples)"\n"0x10","EXIT","0"\n')
    if rc != 1:
        failures.append(f"no samples: rc {rc}, {out!r}")
    for f in failures:
        print("FAIL:", f)
    print("ncu_top_stalls_test:", "FAIL" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
