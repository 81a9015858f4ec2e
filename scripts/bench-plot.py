#!/usr/bin/env python3
"""Draws a megaserve-bench result (--result_json) as one PNG report.

    scripts/bench-plot.py result.json [-o result.png]

Six panels: token throughput over time; the CDFs of TTFT, TPOT, ITL and end-to-end latency;
and running/waiting requests over time. That last panel shows the server's own gauges
(megaserve_requests_running / _waiting) when the result holds `metrics_samples`
([{"time": s, "running": n, "waiting": n}], seconds from the run's start), which
megaserve-bench records when given --metrics_address=HOST:9090; without them the panel shows
the client's view instead (requests in flight, and those still waiting for their first
token) and says so in its title.

Needs matplotlib (scripts/install-deps installs it). --panels_json writes each panel's title
and pixel box (x0, y0, x1, y1 from the image's top left), which tests/bench use.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402  (a dependency of matplotlib)

# The report's size in pixels: FIGSIZE inches at DPI.
FIGSIZE = (18, 10)
DPI = 100
TIMELINE_KEYS = ("arrival_times", "first_token_times", "token_times", "itls")


def load(path):
    with open(path) as f:
        result = json.load(f)
    missing = [k for k in TIMELINE_KEYS if k not in result]
    if missing:
        sys.exit(f"bench-plot: {path} has no {', '.join(missing)}: a result of an older "
                 "megaserve-bench? Rerun it with --result_json")
    return result


def successful(result):
    """Indices of the requests that completed (no error) with at least one token."""
    errors = result.get("errors", [""] * len(result["token_times"]))
    return [i for i, times in enumerate(result["token_times"]) if times and not errors[i]]


def draw_cdf(ax, values_ms, title, color):
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if len(values_ms) == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.sort(np.asarray(values_ms, dtype=float))
    y = np.arange(1, len(x) + 1) / len(x)
    ax.step(x, y, where="post", color=color, linewidth=2)
    for q, style in ((0.5, "--"), (0.99, ":")):
        v = float(np.quantile(x, q))
        ax.axvline(v, color=color, linestyle=style, alpha=0.7,
                   label=f"p{int(q * 100)} {v:.1f} ms")
    ax.legend(loc="lower right")


def time_bins(end_s):
    """About 60 bins over [0, end_s], at least 10 ms wide."""
    width = max(end_s / 60.0, 0.01)
    return np.arange(0.0, end_s + width, width), width


def draw_throughput(ax, result, ok, end_s):
    ax.set_title("Token throughput over time")
    ax.set_xlabel("time since the run's start (s)")
    ax.grid(True, alpha=0.3)
    edges, width = time_bins(end_s)
    out_times = [t for i in ok for t in result["token_times"][i]]
    out_rate, _ = np.histogram(out_times, bins=edges)
    # A prompt's tokens count when its first token arrives (its prefill has finished then).
    prompt_rate, _ = np.histogram([result["first_token_times"][i] for i in ok], bins=edges,
                                  weights=[result["input_lens"][i] for i in ok])
    ax.set_ylabel("output tokens/s")
    out_line = ax.stairs(out_rate / width, edges, color="C0", linewidth=2,
                         label="output tokens/s")
    # Prompt tokens arrive in bursts many times larger: their own axis, on the right.
    right = ax.twinx()
    right.set_ylabel("prompt tokens/s")
    prompt_line = right.stairs(prompt_rate / width, edges, color="C1", linewidth=1, alpha=0.6,
                               label="prompt tokens/s (at first token)")
    ax.set_xlim(0, edges[-1])
    ax.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    ax.legend(handles=[out_line, prompt_line], loc="best", framealpha=0.9)


def draw_requests(ax, result, ok, end_s):
    ax.set_xlabel("time since the run's start (s)")
    ax.set_ylabel("requests")
    ax.grid(True, alpha=0.3)
    samples = result.get("metrics_samples") or []
    if samples:
        ax.set_title("Server: running and waiting requests (scraped metrics)")
        t = [s["time"] for s in samples]
        ax.step(t, [s["running"] for s in samples], where="post", color="C2", linewidth=2,
                label="running")
        ax.step(t, [s["waiting"] for s in samples], where="post", color="C3", linewidth=2,
                label="waiting")
    else:
        ax.set_title("Client view: in flight / awaiting first token (no metrics samples)")
        edges, _ = time_bins(end_s)
        arrivals = np.asarray([result["arrival_times"][i] for i in ok])
        firsts = np.asarray([result["first_token_times"][i] for i in ok])
        lasts = np.asarray([result["token_times"][i][-1] for i in ok])
        in_flight = [np.sum((arrivals <= t) & (lasts > t)) for t in edges]
        awaiting = [np.sum((arrivals <= t) & (firsts > t)) for t in edges]
        ax.step(edges, in_flight, where="post", color="C2", linewidth=2, label="in flight")
        ax.step(edges, awaiting, where="post", color="C3", linewidth=2,
                label="awaiting first token")
    ax.set_xlim(0, max(end_s, 1e-3))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")


def latencies_ms(result, ok):
    ttft, tpot, e2e = [], [], []
    for i in ok:
        times = result["token_times"][i]
        sent = result["arrival_times"][i]
        ttft.append((times[0] - sent) * 1e3)
        e2e.append((times[-1] - sent) * 1e3)
        if len(times) > 1:  # the peers' TPOT: after the first token, per further token
            tpot.append((times[-1] - times[0]) / (len(times) - 1) * 1e3)
    itl = [gap * 1e3 for i in ok for gap in result["itls"][i]]
    return ttft, tpot, itl, e2e


def title_of(result, ok):
    model = result.get("model", {})
    summary = result.get("summary", {})
    parts = [f"{model.get('name', '?')} ({model.get('backend', '?')})",
             f"{len(ok)}/{len(result['token_times'])} requests",
             f"rate {result.get('config', {}).get('request_rate', '?')} req/s"]
    if "duration_s" in summary:
        parts.append(f"{summary['duration_s']:.2f} s")
    if "total_token_throughput" in summary:
        parts.append(f"{summary['total_token_throughput']:.0f} total tok/s")
    return "megaserve-bench: " + ", ".join(parts)


def render(result, out_path):
    """Writes the report; returns [(title, (x0, y0, x1, y1))] of its panels in pixels."""
    ok = successful(result)
    end_s = max([result["token_times"][i][-1] for i in ok] +
                [result.get("summary", {}).get("duration_s", 0.0), 1e-3])
    ttft, tpot, itl, e2e = latencies_ms(result, ok)

    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    fig.suptitle(title_of(result, ok), fontsize=14)
    draw_throughput(axes[0][0], result, ok, end_s)
    draw_requests(axes[0][1], result, ok, end_s)
    draw_cdf(axes[0][2], e2e, "End-to-end latency CDF", "C4")
    draw_cdf(axes[1][0], ttft, "TTFT CDF", "C0")
    draw_cdf(axes[1][1], tpot, "TPOT CDF", "C1")
    draw_cdf(axes[1][2], itl, "ITL CDF", "C2")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out_path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI

    height = FIGSIZE[1] * DPI
    panels = []
    for ax in axes.flat:
        x0, y0, x1, y1 = ax.get_window_extent().extents  # from the bottom left
        panels.append((ax.get_title(),
                       (int(math.ceil(x0)), int(math.ceil(height - y1)), int(x1), int(height - y0))))
    plt.close(fig)
    return panels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_json", help="a megaserve-bench --result_json file")
    parser.add_argument("-o", "--output", help="the PNG to write (default: RESULT.png)")
    parser.add_argument("--panels_json", help="also write the panels' titles and pixel boxes")
    args = parser.parse_args()
    out = args.output or os.path.splitext(args.result_json)[0] + ".png"
    panels = render(load(args.result_json), out)
    if args.panels_json:
        with open(args.panels_json, "w") as f:
            json.dump([{"title": t, "box": list(b)} for t, b in panels], f, indent=2)
    print(f"bench-plot: wrote {out}")


if __name__ == "__main__":
    main()
