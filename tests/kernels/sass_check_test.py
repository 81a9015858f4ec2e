#!/usr/bin/env python3
"""scripts/sass-check.py on hand-written SASS listings (the format of `cuobjdump -sass`): a spill
reload inside the innermost loop around an HGMMA fails the check, one in an enclosing loop or
outside does not, and a listing without HGMMAs in loops is not a pass.
Usage: sass_check_test.py SASS_CHECK TMPDIR"""
import os
import subprocess
import sys


def listing(body):
    lines = ["\tcode for sm_90a", "\t\tFunction : _Z6kernelv"]
    for address, text in body:
        lines.append(f"        /*{address:04x}*/                   {text} ;   /* 0x0000 */")
        lines.append("                                                              /* 0x0000 */")
    return "\n".join(lines) + "\n"


def check(script, tmp, name, body):
    path = os.path.join(tmp, name + ".sass")
    with open(path, "w") as f:
        f.write(listing(body))
    run = subprocess.run([sys.executable, script, "--sass", path], capture_output=True, text=True)
    return run.returncode, run.stdout


def main():
    script, tmp = sys.argv[1], sys.argv[2]
    os.makedirs(tmp, exist_ok=True)
    hgmma = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24, gsb0"
    outer_spill = [
        (0x00, "LDL R2, [R1+0x10]"),
        (0x10, "MOV R3, R2"),
        (0x20, hgmma),
        (0x30, "WARPGROUP.DEPBAR.LE gsb0, 0x1"),
        (0x40, "@P0 BRA 0x20"),           # the k-loop: 0x20-0x40
        (0x50, "LDL R4, [R1+0x18]"),      # outer loop only
        (0x60, "@P1 BRA 0x10"),
        (0x70, "STL [R1+0x20], R4"),      # after both loops
        (0x80, "EXIT"),
    ]
    failures = []
    rc, out = check(script, tmp, "clean", outer_spill)
    if rc != 0 or "1 HGMMA, 0 LDL, 0 STL" not in out:
        failures.append(f"clean: rc {rc}\n{out}")
    inner_spill = list(outer_spill)
    inner_spill[3] = (0x30, "LDL R5, [R1+0x8]")
    rc, out = check(script, tmp, "inner", inner_spill)
    if rc != 1 or "1 HGMMA, 1 LDL, 0 STL" not in out:
        failures.append(f"inner LDL: rc {rc}\n{out}")
    store = list(outer_spill)
    store[3] = (0x30, "STL [R1+0x8], R5")
    rc, out = check(script, tmp, "store", store)
    if rc != 1 or "0 LDL, 1 STL" not in out:
        failures.append(f"inner STL: rc {rc}\n{out}")
    no_loop = [(0x00, hgmma), (0x10, "EXIT")]
    rc, out = check(script, tmp, "noloop", no_loop)
    if rc != 2:
        failures.append(f"no loop: rc {rc}\n{out}")
    if failures:
        sys.exit("FAIL\n" + "\n".join(failures))
    print("PASS: 4 listings")


if __name__ == "__main__":
    main()
