#!/usr/bin/env python3
"""Local memory in the tensor-core loops: the Hopper compute-core issue's bar "no local-memory
loads or stores in the consumer loops", checked on the machine code.

Reads the SASS of a CUDA binary or object (`cuobjdump -sass`, or a saved listing with --sass)
and finds, for every HGMMA (wgmma) instruction, the innermost loop holding it: the shortest
address range [target, branch] of a backward branch (BRA to a lower address) around it. Prints
one line per such loop (function, range, HGMMAs, LDL, STL) and exits 1 when any holds an LDL or
STL (a spill reload or store: local memory is an L2 round trip when shared memory takes nearly
all of L1), 2 when there are no HGMMAs at all.

Usage: sass-check.py BINARY [--cuobjdump PATH] | sass-check.py --sass LISTING
"""
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
FUNCTION = re.compile(r"Function : (\S+)")
BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)")


def functions(sass):
    """Yields (name, [(address, text)]) per function of the listing."""
    name, body = None, []
    for line in sass.splitlines():
        m = FUNCTION.search(line)
        if m:
            if name is not None:
                yield name, body
            name, body = m.group(1), []
            continue
        m = INSTRUCTION.search(line)
        if m and name is not None:
            body.append((int(m.group(1), 16), m.group(2).strip()))
    if name is not None:
        yield name, body


def tensor_loops(body):
    """The innermost backward-branch range around each HGMMA, with its counts."""
    loops = []
    for address, text in body:
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    found = {}
    for address, text in body:
        if "HGMMA" not in text:
            continue
        around = [lp for lp in loops if lp[0] <= address <= lp[1]]
        if not around:
            continue
        found.setdefault(min(around, key=lambda lp: lp[1] - lp[0]), None)
    result = []
    for lo, hi in sorted(found):
        inside = [t for a, t in body if lo <= a <= hi]
        count = lambda op: sum(1 for t in inside if re.search(r"(^|\s)" + op + r"(\.|\s)", t))
        result.append((lo, hi, count("HGMMA"), count("LDL"), count("STL")))
    return result


def main(argv):
    if len(argv) >= 3 and argv[1] == "--sass":
        sass = open(argv[2]).read()
    elif len(argv) >= 2:
        tool = argv[argv.index("--cuobjdump") + 1] if "--cuobjdump" in argv else "cuobjdump"
        sass = subprocess.run([tool, "-sass", argv[1]], check=True, capture_output=True,
                              text=True).stdout
    else:
        sys.exit(__doc__)
    hgmma = bad = 0
    for name, body in functions(sass):
        for lo, hi, n, ldl, stl in tensor_loops(body):
            hgmma += n
            bad += ldl + stl
            print(f"{name[:60]:60s} loop 0x{lo:x}-0x{hi:x}: {n} HGMMA, {ldl} LDL, {stl} STL")
    if hgmma == 0:
        print("sass-check: no HGMMA inside a loop")
        return 2
    print(f"sass-check: {'FAIL' if bad else 'ok'}: {bad} local-memory accesses in the wgmma loops")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
