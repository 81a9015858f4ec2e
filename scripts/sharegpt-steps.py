#!/usr/bin/env python3
"""Where a megaserve-bench run's time went, step by step, from its result alone.

    scripts/sharegpt-steps.py result.json [--gap_ms=3] [--windows=10] [--json]

megaserve-bench --result_json keeps every streamed token's arrival time (token_times, seconds,
per request). A server step streams one token to each request it sampled, all within a
moment, so the tokens whose arrivals lie less than --gap_ms apart are taken as one step; a
step lasts until the next one's first token. Two tables follow: by the step's token count
(the batch it sampled, in power-of-two buckets) and by time window (the run cut into
--windows equal parts), each with the steps, their seconds, the mean step and the first
tokens (requests whose prompt the step finished) with their prompt tokens (input_lens). The
last step has no end and is left out of both. --json prints the same as one JSON object.
"""

import argparse
import json
import sys


def find_steps(token_times, gap_s):
    """[(start, tokens, [request of each first token])] in time order."""
    events = sorted((t, i, j) for i, times in enumerate(token_times) for j, t in enumerate(times))
    steps = []
    last = None
    for t, i, j in events:
        if last is None or t - last >= gap_s:
            steps.append([t, 0, []])
        steps[-1][1] += 1
        if j == 0:
            steps[-1][2].append(i)
        last = t
    return steps


def bucket_of(tokens):
    """The power-of-two bucket (lo, hi) holding a step of `tokens` tokens."""
    lo = 1
    while lo * 2 <= tokens:
        lo *= 2
    return lo, lo * 2 - 1


def summarize(result, gap_s, windows):
    token_times = result.get("token_times")
    if not isinstance(token_times, list) or not any(token_times):
        raise ValueError("no token_times: not a megaserve-bench --result_json file, or no tokens")
    input_lens = result.get("input_lens") or [0] * len(token_times)
    steps = find_steps(token_times, gap_s)
    t0 = steps[0][0]
    span = steps[-1][0] - t0
    rows = {}
    wins = [{"from_s": span * w / windows, "to_s": span * (w + 1) / windows, "steps": 0,
             "seconds": 0.0, "tokens": 0, "first_tokens": 0, "prompt_tokens": 0}
            for w in range(windows)]
    for (start, tokens, firsts), nxt in zip(steps, steps[1:]):
        seconds = nxt[0] - start
        prompt = sum(input_lens[i] for i in firsts)
        lo, hi = bucket_of(tokens)
        row = rows.setdefault(lo, {"tokens_from": lo, "tokens_to": hi, "steps": 0,
                                   "seconds": 0.0, "first_tokens": 0, "prompt_tokens": 0})
        w = wins[min(windows - 1, int((start - t0) / span * windows)) if span > 0 else 0]
        for r in (row, w):
            r["steps"] += 1
            r["seconds"] += seconds
            r["first_tokens"] += len(firsts)
            r["prompt_tokens"] += prompt
        w["tokens"] += tokens
    for r in list(rows.values()) + wins:
        r["mean_step_ms"] = 1e3 * r["seconds"] / r["steps"] if r["steps"] else 0.0
    for w in wins:
        w["mean_tokens"] = w["tokens"] / w["steps"] if w["steps"] else 0.0
    return {"steps": len(steps), "span_s": span, "by_tokens": [rows[k] for k in sorted(rows)],
            "by_window": wins}


def print_tables(s):
    print(f"{s['steps']} steps over {s['span_s']:.2f} s (the last one, with no end, left out)")
    print(f"{'tokens/step':>13} {'steps':>7} {'seconds':>9} {'mean ms':>9} {'firsts':>7} "
          f"{'prompt tok':>11}")
    for r in s["by_tokens"]:
        name = f"{r['tokens_from']}-{r['tokens_to']}"
        print(f"{name:>13} {r['steps']:>7} {r['seconds']:>9.2f} {r['mean_step_ms']:>9.2f} "
              f"{r['first_tokens']:>7} {r['prompt_tokens']:>11}")
    print(f"{'window s':>13} {'steps':>7} {'seconds':>9} {'mean ms':>9} {'tok/step':>9} "
          f"{'firsts':>7} {'prompt tok':>11}")
    for w in s["by_window"]:
        name = f"{w['from_s']:.1f}-{w['to_s']:.1f}"
        print(f"{name:>13} {w['steps']:>7} {w['seconds']:>9.2f} {w['mean_step_ms']:>9.2f} "
              f"{w['mean_tokens']:>9.1f} {w['first_tokens']:>7} {w['prompt_tokens']:>11}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result")
    p.add_argument("--gap_ms", type=float, default=3.0)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.gap_ms <= 0 or a.windows < 1:
        print("sharegpt-steps: --gap_ms must be > 0 and --windows >= 1", file=sys.stderr)
        return 2
    try:
        with open(a.result) as f:
            result = json.load(f)
        s = summarize(result, a.gap_ms * 1e-3, a.windows)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"sharegpt-steps: {a.result}: {e}", file=sys.stderr)
        return 2
    if a.json:
        json.dump(s, sys.stdout, indent=1)
        print()
    else:
        print_tables(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
