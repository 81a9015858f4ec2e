#!/usr/bin/env python3
"""The same-run peer of megaserve-bench: Hugging Face transformers' continuous batching on
the very requests megaserve-bench sent.

megaserve-bench --dump_requests=FILE writes the sampled requests (each prompt's token ids,
with BOS, as the server saw them, and the number of tokens to generate). This script builds a
model of the same shape from a config.json with random (dummy) weights, in bf16 on the GPU,
hands every request to transformers' ContinuousBatchingManager at t = 0 (each with its own
max_new_tokens and EOS disabled, so every request generates exactly its output length, as
megaserve's ignore_eos requests do), and prints a summary in megaserve-bench's layout:
requests, wall time, output and total tok/s.

  bench/hf_peer.py REQUESTS.json --config=configs/models/llama-3.1-8b.json
      [--device=cuda] [--dtype=bfloat16] [--num_requests=N] [--result_json=OUT]
      [--cb KEY=VALUE ...]      fields of transformers' ContinuousBatchingConfig
  bench/hf_peer.py REQUESTS.json --config=tiny --device=cpu --dtype=float32 --num_requests=4
      --max_output_len=8        a smoke run: a 2-layer Llama with the Llama-2 vocabulary
  bench/hf_peer.py REQUESTS.json --config=... --dry_run
      checks the requests against the config and prints the workload; needs no torch
  bench/hf_peer.py --self_test  the parts that need no torch, on hand-made data

Exit codes: 0 every request generated its length, 1 a request failed or came back short,
2 unusable input or environment (missing file, torch or transformers absent, no GPU).
"""
import argparse
import importlib
import inspect
import json
import os
import sys
import time

# A 2-layer Llama with the Llama-2 vocabulary (megaserve-bench's token ids fit): for smoke runs.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


class UsageError(Exception):
    """Unusable input or environment: exit code 2, with the message."""


def load_requests(path, num_requests=0, max_output_len=0):
    """The requests of a megaserve-bench --dump_requests file: (header, [(ids, output_len)]).
    num_requests > 0 keeps the first N; max_output_len > 0 caps each output length."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})")
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise UsageError(f"{path}: expected megaserve-bench --dump_requests output "
                         "(an object with a \"requests\" list)")
    requests = []
    for i, r in enumerate(doc["requests"]):
        ids = r.get("prompt_token_ids") if isinstance(r, dict) else None
        out = r.get("output_len") if isinstance(r, dict) else None
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and t >= 0 for t in ids)):
            raise UsageError(f"{path}: request {i} has no list of token ids")
        if not isinstance(out, int) or out < 1:
            raise UsageError(f"{path}: request {i} has no output_len >= 1")
        requests.append((ids, min(out, max_output_len) if max_output_len > 0 else out))
    if num_requests > 0:
        requests = requests[:num_requests]
    if not requests:
        raise UsageError(f"{path}: no request")
    header = {k: v for k, v in doc.items() if k != "requests"}
    return header, requests


def load_config(spec):
    """The config dict: 'tiny' or a config.json path (or a folder holding one)."""
    if spec == "tiny":
        return dict(TINY_CONFIG)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})")
    for key in ("model_type", "vocab_size"):
        if key not in config:
            raise UsageError(f"{path}: no \"{key}\"")
    return config


def check_requests(requests, config):
    """Every token id inside the vocabulary, every sequence inside the positions."""
    vocab = config["vocab_size"]
    positions = config.get("max_position_embeddings")
    for i, (ids, out) in enumerate(requests):
        if max(ids) >= vocab:
            raise UsageError(f"request {i} has token id {max(ids)}, outside the config's "
                             f"vocabulary of {vocab}")
        if positions and len(ids) + out > positions:
            raise UsageError(f"request {i} needs {len(ids) + out} positions, the config has "
                             f"{positions}")


def parse_cb_options(items):
    """KEY=VALUE strings into a dict, values as JSON where they parse (ints, floats,
    true/false), else strings."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--cb {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def summarize(requests, generated, failed, duration_s):
    """generated: tokens each request produced (None where it failed)."""
    ok = [(r, g) for r, g in zip(requests, generated) if g is not None]
    input_tokens = sum(len(ids) for (ids, _), _ in ok)
    output_tokens = sum(g for _, g in ok)
    short = sum(1 for (_, out), g in ok if g != out)
    d = duration_s if duration_s > 0 else float("nan")
    return {
        "completed": len(ok), "failed": failed, "short": short, "duration_s": duration_s,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / d, "input_throughput": input_tokens / d,
        "output_throughput": output_tokens / d,
        "total_token_throughput": (input_tokens + output_tokens) / d,
    }


def format_summary(s, title="transformers continuous batching"):
    """megaserve-bench's layout (bench/sharegpt_stats.cc format_summary)."""
    width = 54
    pad = max(0, width - len(title) - 2)
    lines = ["-" * (pad // 2) + " " + title + " " + "-" * (pad - pad // 2)]

    def line(label, value, decimals=2):
        lines.append(f"{label:<42}{value:>12.{decimals}f}")

    line("Successful requests:", s["completed"], 0)
    line("Failed requests:", s["failed"], 0)
    line("Requests not of their output length:", s["short"], 0)
    line("Benchmark duration (s):", s["duration_s"])
    line("Total input tokens:", s["total_input_tokens"], 0)
    line("Total generated tokens:", s["total_output_tokens"], 0)
    line("Request throughput (req/s):", s["request_throughput"])
    line("Input token throughput (tok/s):", s["input_throughput"])
    line("Output token throughput (tok/s):", s["output_throughput"])
    line("Total token throughput (tok/s):", s["total_token_throughput"])
    lines.append("=" * width)
    return "\n".join(lines) + "\n"


def import_torch_transformers():
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise UsageError(f"python3 cannot import torch and transformers ({e}); the peer runs "
                         "where they are installed (the GPU host)")
    return torch, transformers


def build_model(torch, transformers, config_dict, device, dtype, attn_implementation):
    """A model of the config's shape with random weights, created on `device` directly (an
    8B model initialized on the CPU first would take minutes)."""
    import tempfile
    from transformers import AutoConfig, AutoModelForCausalLM
    # Through a config.json on disk, as a checkpoint's: from_pretrained maps the older field
    # names that such files carry (rope_scaling, torch_dtype) to the running version's.
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_dict, f)
        try:
            config = AutoConfig.from_pretrained(folder)
        except (KeyError, ValueError, OSError) as e:
            raise UsageError(f"transformers {transformers.__version__} cannot build a config "
                             f"for model_type {config_dict.get('model_type')!r} ({e})")
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # transformers 5 names it dtype; 4.x torch_dtype.
    params = inspect.signature(AutoModelForCausalLM.from_config).parameters
    dtype_key = "dtype" if "dtype" in params or "torch_dtype" not in params else "torch_dtype"
    kwargs[dtype_key] = dtype
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def run_peer(args, requests, config_dict):
    torch, transformers = import_torch_transformers()
    from transformers import GenerationConfig
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but torch sees no GPU (smoke runs: --device=cpu)")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--dtype={args.dtype}: not a torch dtype")
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = build_model(torch, transformers, config_dict, args.device, dtype,
                        args.attn_implementation)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
        f"{args.dtype} on {args.device}, built in {time.perf_counter() - t_build:.1f} s; "
        f"transformers {transformers.__version__}, torch {torch.__version__}")

    max_out = max(out for _, out in requests)
    # Greedy, and no EOS (each request below passes eos_token_id=-1, which disables it): every
    # request runs to its own max_new_tokens, as megaserve's ignore_eos requests do.
    generation_config = GenerationConfig(max_new_tokens=max_out, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
    init_kwargs = {"generation_config": generation_config}
    cb_options = parse_cb_options(args.cb)
    if cb_options:
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            from transformers.generation import ContinuousBatchingConfig
        try:
            init_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**cb_options)
        except TypeError as e:
            raise UsageError(f"--cb: {e}")
    if not hasattr(model, "init_continuous_batching"):
        raise UsageError(f"transformers {transformers.__version__} has no continuous batching "
                         "(init_continuous_batching); 5.x has it")
    init_params = inspect.signature(model.init_continuous_batching).parameters
    if "workload_hints" in init_params:
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints
            init_kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(len(ids) for ids, _ in requests),
                max_generated_length=max_out)
        except (ImportError, TypeError):
            pass
    manager = model.init_continuous_batching(**init_kwargs)
    warm = args.warmup if args.warmup is not None else args.device.startswith("cuda")
    if warm and hasattr(manager, "warmup"):
        t_warm = time.perf_counter()
        manager.warmup()
        log(f"warm-up (CUDA graphs) took {time.perf_counter() - t_warm:.1f} s")
    manager.start()
    generated = [None] * len(requests)
    errors = {}
    try:
        # All requests at t = 0, as megaserve-bench sends them with --request_rate=inf.
        start = time.perf_counter()
        for i, (ids, out) in enumerate(requests):
            manager.add_request(input_ids=ids, request_id=f"req_{i}", max_new_tokens=out,
                                eos_token_id=-1)
        done = 0
        deadline = start + args.timeout_s
        last_report = start
        while done < len(requests):
            result = manager.get_result(timeout=1)
            now = time.perf_counter()
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"the generation thread stopped after {done} of "
                                       f"{len(requests)} requests (see transformers' log)")
                if now > deadline:
                    raise RuntimeError(f"--timeout_s={args.timeout_s} passed with {done} of "
                                       f"{len(requests)} requests done")
            elif result.is_finished():
                i = int(str(result.request_id).rsplit("_", 1)[-1])
                error = getattr(result, "error", None)
                if error:
                    errors[i] = str(error)
                else:
                    generated[i] = len(result.generated_tokens)
                done += 1
            if args.progress and now - last_report > 10:
                log(f"{done}/{len(requests)} requests done after {now - start:.0f} s")
                last_report = now
        duration = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
    for i, error in sorted(errors.items())[:5]:
        log(f"request {i} failed: {error}")
    return summarize(requests, generated, len(errors), duration), torch, transformers


def log(message):
    print(f"hf_peer: {message}", file=sys.stderr, flush=True)


def self_test():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "requests.json")
        with open(path, "w") as f:
            json.dump({"seed": 0, "requests": [
                {"prompt_token_ids": [1, 5, 6], "output_len": 4},
                {"prompt_token_ids": [1, 7], "output_len": 10},
                {"prompt_token_ids": [1, 31999], "output_len": 2}]}, f)
        header, requests = load_requests(path)
        assert header == {"seed": 0} and len(requests) == 3, (header, requests)
        _, capped = load_requests(path, num_requests=2, max_output_len=5)
        assert capped == [([1, 5, 6], 4), ([1, 7], 5)], capped
        check_requests(requests, TINY_CONFIG)
        for bad, what in (({"requests": [{"prompt_token_ids": [], "output_len": 1}]}, "token"),
                          ({"requests": [{"prompt_token_ids": [1], "output_len": 0}]}, "output"),
                          ({"requests": []}, "no request"), ([1, 2], "expected")):
            with open(path, "w") as f:
                json.dump(bad, f)
            try:
                load_requests(path)
                raise AssertionError(f"accepted {bad}")
            except UsageError as e:
                assert what in str(e), (what, str(e))
        try:
            check_requests([([1, 32000], 4)], TINY_CONFIG)
            raise AssertionError("accepted a token outside the vocabulary")
        except UsageError as e:
            assert "vocabulary of 32000" in str(e), str(e)
        try:
            load_config(os.path.join(d, "missing.json"))
            raise AssertionError("read a missing config")
        except UsageError as e:
            assert "cannot read" in str(e), str(e)
    assert parse_cb_options(["max_batch_tokens=512", "use_cuda_graph=false", "x=y"]) == {
        "max_batch_tokens": 512, "use_cuda_graph": False, "x": "y"}
    s = summarize([([1, 2, 3], 4), ([1, 2], 5), ([1], 6)], [4, 3, None], 1, 2.0)
    assert (s["completed"], s["failed"], s["short"]) == (2, 1, 1), s
    assert s["total_input_tokens"] == 5 and s["total_output_tokens"] == 7, s
    assert abs(s["total_token_throughput"] - 6.0) < 1e-9, s
    text = format_summary(s)
    assert "Total token throughput (tok/s):" in text and text.endswith("=" * 54 + "\n"), text
    assert all(len(l) == 54 for l in text.splitlines()), text
    print("hf_peer self-test: 1 passed, 0 failed")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requests", nargs="?", help="a megaserve-bench --dump_requests file")
    parser.add_argument("--config", help="a config.json (or its folder), or 'tiny'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn_implementation", default=None,
                        help="transformers' attention for the model (default: its own choice)")
    parser.add_argument("--num_requests", type=int, default=0, help="the first N (0: all)")
    parser.add_argument("--max_output_len", type=int, default=0,
                        help="cap every output length (smoke runs; 0: none)")
    parser.add_argument("--cb", action="append", metavar="KEY=VALUE",
                        help="a ContinuousBatchingConfig field, e.g. max_batch_tokens=8192")
    parser.add_argument("--warmup", dest="warmup", action="store_true", default=None,
                        help="capture CUDA graphs before the timed run (default on cuda)")
    parser.add_argument("--no_warmup", dest="warmup", action="store_false")
    parser.add_argument("--timeout_s", type=float, default=3600)
    parser.add_argument("--result_json", help="write the configuration and summary here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dry_run", action="store_true",
                        help="check the requests against the config, print the workload, run "
                             "nothing (needs no torch)")
    parser.add_argument("--self_test", action="store_true")
    args = parser.parse_args(argv)
    if args.self_test:
        self_test()
        return 0
    try:
        if not args.requests or not args.config:
            raise UsageError("give a --dump_requests file and --config (see --help)")
        header, requests = load_requests(args.requests, args.num_requests, args.max_output_len)
        config = load_config(args.config)
        check_requests(requests, config)
        prompt = sum(len(ids) for ids, _ in requests)
        output = sum(out for _, out in requests)
        print(f"{len(requests)} requests from {args.requests}: {prompt / len(requests):.1f} "
              f"prompt / {output / len(requests):.1f} output tokens on average; model "
              f"{config['model_type']} from {args.config}")
        if args.dry_run:
            return 0
        summary, torch, transformers = run_peer(args, requests, config)
    except UsageError as e:
        print(f"hf_peer: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), end="")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"config": {"requests": args.requests, "model_config": args.config,
                                  "device": args.device, "dtype": args.dtype,
                                  "cb": parse_cb_options(args.cb),
                                  "num_requests": len(requests),
                                  "max_output_len": args.max_output_len,
                                  "transformers": transformers.__version__,
                                  "torch": torch.__version__},
                       "requests_file": header, "summary": summary}, f, indent=2)
    return 0 if summary["failed"] == 0 and summary["short"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
