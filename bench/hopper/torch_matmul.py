#!/usr/bin/env python3
"""Times torch.matmul (bf16, A @ W.T) on the shapes of bench/hopper/gemm_bench and prints the
same table; with --ours CSV (written by gemm_bench --csv) it also prints both side by side with
the ratio ours / torch in TFLOP/s. --ms M1,M2,... times the four projection shapes at those M
only, and --rates FILE writes "<shape> <M> <TFLOP/s>" lines (scripts/gpu-suite's peer for
bench/gpu_projection_bench). --decode-anchor LAYERS prints only the kernel-per-op anchor of a
batch-1 decode step (issue 12): the four projections' GEMVs (M = 1) of LAYERS layers plus the LM
head's (128,256 x 4,096), each timed as above, summed; attention and norms left out.

Usage: torch_matmul.py [--ours FILE] [--iters N] [--quick] [--small] [--csv FILE]
                       [--ms LIST] [--rates FILE] [--decode-anchor LAYERS]
"""
import argparse
import csv
import sys

# Keep in step with the case list in gemm_bench.cu (shape, M, N, K).
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336)]
LM_HEAD = ("lm_head", 128256, 4096)  # Llama-3.1-8B's vocabulary x hidden
MS_FULL = [128, 256, 1024, 4096, 8192]
MS_QUICK = [128, 1024, 8192]


def cases(quick, small=False, ms=None):
    if ms:
        return [(name, m, n, k) for name, n, k in SHAPES for m in ms]
    out = [("tail", 333, 1001, 640), ("tail", 1000, 3000, 192)]
    if small:
        return out + [("qkv", 128, 6144, 4096), ("o", 1000, 4096, 4096)]
    for name, n, k in SHAPES:
        for m in (MS_QUICK if quick else MS_FULL):
            out.append((name, m, n, k))
        if name == "o":
            out.append((name, 1000, n, k))
    return out


def time_case(torch, m, n, k, iters):
    """Mean ms of one matmul over `iters` back-to-back runs, replayed from a CUDA graph so that
    Python launch overhead does not count (cuBLAS kernel time, as gemm_bench measures ours)."""
    a = torch.empty(m, k, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    w = torch.empty(n, k, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    c = torch.matmul(a, w.t())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(3):
            torch.matmul(a, w.t(), out=c)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                torch.matmul(a, w.t(), out=c)
        g.replay()  # warm replay
        torch.cuda.synchronize()
        e0.record()
        g.replay()
        e1.record()
    except RuntimeError as err:  # fall back to eager launches
        print(f"  (graph capture failed: {err}; timing eager launches)", file=sys.stderr)
        torch.cuda.synchronize()
        e0.record()
        for _ in range(iters):
            torch.matmul(a, w.t(), out=c)
        e1.record()
    e1.synchronize()
    ms = e0.elapsed_time(e1) / iters
    del a, w, c
    return ms


def decode_anchor(torch, layers, iters):
    """The kernel-per-op anchor of a batch-1 decode step: one cuBLAS GEMV per projection and
    layer, then the LM head's, as a server of one kernel per op runs them (launch gaps and
    attention left out, so it flatters that server)."""
    per_layer = {name: time_case(torch, 1, n, k, iters) for name, n, k in SHAPES}
    lm = time_case(torch, 1, LM_HEAD[1], LM_HEAD[2], iters)
    layer_ms = sum(per_layer.values())
    parts = " + ".join(f"{name} {ms:.4f}" for name, ms in per_layer.items())
    print(f"decode_anchor batch 1: {layers} layers x ({parts}) ms + lm_head {lm:.4f} ms = "
          f"{layers * layer_ms + lm:.3f} ms of cuBLAS GEMVs")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="CSV from gemm_bench --csv, to print side by side")
    ap.add_argument("--csv", help="write torch's results here")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--ms", help="comma-separated M values of the projection shapes only")
    ap.add_argument("--rates", help="write '<shape> <M> <TFLOP/s>' lines here")
    ap.add_argument("--decode-anchor", type=int, metavar="LAYERS",
                    help="print only the batch-1 decode GEMV sum of LAYERS layers + LM head")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")] if args.ms else None

    import torch
    if not torch.cuda.is_available():
        print("torch_matmul.py: no CUDA device visible to torch", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0)}")
    if args.decode_anchor:
        return decode_anchor(torch, args.decode_anchor, max(args.iters, 1))
    # cuBLAS may use reduced-precision reductions for bf16 by default; that is its normal mode
    # and what a server using torch would get, so it is left as is.

    print("\ntorch.matmul (bf16, A @ W.T)")
    print(f"{'shape':<8} {'M':>6} {'N':>6} {'K':>6} {'ms':>10} {'TFLOP/s':>9}")
    results = {}
    for name, m, n, k in cases(args.quick, args.small, ms):
        ms = time_case(torch, m, n, k, max(args.iters, 1))
        tf = 2.0 * m * n * k / (ms * 1e-3) / 1e12
        results[(name, m, n, k)] = (ms, tf)
        print(f"{name:<8} {m:>6} {n:>6} {k:>6} {ms:>10.4f} {tf:>9.1f}", flush=True)
        torch.cuda.empty_cache()

    if args.csv:
        with open(args.csv, "w") as f:
            f.write("shape,M,N,K,ms,tflops\n")
            for (name, m, n, k), (ms, tf) in results.items():
                f.write(f"{name},{m},{n},{k},{ms:.5f},{tf:.2f}\n")

    if args.rates:
        with open(args.rates, "w") as f:
            for (name, m, n, k), (_, tf) in results.items():
                f.write(f"{name} {m} {tf:.1f}\n")

    if args.ours:
        with open(args.ours) as f:
            ours = {(r["shape"], int(r["M"]), int(r["N"]), int(r["K"])): r
                    for r in csv.DictReader(f)}
        print("\nmegaserve hopper tile vs torch.matmul (same run, same GPU)")
        print(f"{'shape':<8} {'M':>6} {'N':>6} {'K':>6} {'ours ms':>9} {'ours TF':>8} "
              f"{'torch ms':>9} {'torch TF':>8} {'ratio':>6} {'max_err':>9}")
        worst = None
        for key, (tms, ttf) in results.items():
            r = ours.get(key)
            if r is None:
                continue
            otf = float(r["tflops"])
            ratio = otf / ttf if ttf > 0 else float("nan")
            if key[1] >= 1024 and key[0] != "tail":
                worst = ratio if worst is None else min(worst, ratio)
            print(f"{key[0]:<8} {key[1]:>6} {key[2]:>6} {key[3]:>6} {float(r['ms']):>9.4f} "
                  f"{otf:>8.1f} {tms:>9.4f} {ttf:>8.1f} {ratio:>6.2f} "
                  f"{float(r['max_err']):>9.2e}")
        if worst is not None:
            print(f"\nworst ratio at M >= 1024 (issue 11 bar: >= 0.75): {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
