#!/usr/bin/env python3
"""The peer of bench/gpu_attention_bench: torch's scaled_dot_product_attention (bf16) on the
same Llama-3.1-8B attention shapes (32 q heads, 8 kv heads, head dim 128), timed from CUDA
graphs so that Python launch overhead does not count. Prints the backend torch picked.
  - decode: 256 requests of one query row against contexts 512, 2048 and 8192 (contiguous
    K/V: torch has no paged cache), as KV TB/s;
  - prefill: 8192 tokens, causal, as TFLOP/s (4 * heads * head_dim * n (n + 1) / 2 FLOP, the
    count gpu_attention_bench uses).
Usage: torch_sdpa.py [--iters N]
"""
import argparse
import sys

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCH, CONTEXTS, PREFILL = 256, (512, 2048, 8192), 8192


def graph_ms(torch, fn, iters):
    """Mean ms of fn() over `iters` runs replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters


def backend_name(torch, q, k, v, causal):
    """The first SDPA backend that takes these inputs, in torch's order of preference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return b.name.lower()
        except RuntimeError:
            continue
    return "none"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_sdpa.py: torch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("torch_sdpa.py: no CUDA device visible to torch", file=sys.stderr)
        return 1
    F = torch.nn.functional
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    print(f"torch {torch.__version__} scaled_dot_product_attention on {torch.cuda.get_device_name()}")
    for context in CONTEXTS:
        q = torch.randn(BATCH, HEADS, 1, HEAD_DIM, **bf16)
        k = torch.randn(BATCH, KV_HEADS, context + 1, HEAD_DIM, **bf16)
        v = torch.randn_like(k)
        ms = graph_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                      args.iters)
        kv_bytes = 2 * k.numel() * 2
        print(f"torch_sdpa_decode ctx {context}: {kv_bytes / 1e9:.3f} GB KV in {ms:.3f} ms: "
              f"{kv_bytes / (ms * 1e-3) / 1e12:.3f} TB/s ({backend_name(torch, q, k, v, False)})")
        del q, k, v
    n = PREFILL
    q = torch.randn(1, HEADS, n, HEAD_DIM, **bf16)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, **bf16)
    v = torch.randn_like(k)
    ms = graph_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True), args.iters)
    flops = 4.0 * HEADS * HEAD_DIM * n * (n + 1) / 2
    print(f"torch_sdpa_prefill {n} tokens causal: {flops / 1e12:.3f} TFLOP in {ms:.3f} ms: "
          f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s ({backend_name(torch, q, k, v, True)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
