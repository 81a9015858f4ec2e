#!/usr/bin/env python3
"""Draws a megaserve step timeline (a Chrome trace JSON written by engine/step_trace's
chrome_trace_json: the CUDA backend's per-SM device timestamps, or the CPU interpreter's
per-virtual-SM timeline) as a PNG: one row per SM, one coloured bar per instruction (colour =
opcode, legend on the right), its wait before it shaded grey.

    trace-plot.py TRACE.json [TRACE.json ...] [-o OUT.png] [--width PIXELS]

Each TRACE.json becomes TRACE.png (-o: only with one trace). The server's step capture
(--trace_steps, docs/tracing.md) runs it over the traces it writes. The same JSON opens in
chrome://tracing or https://ui.perfetto.dev (Open trace file).
"""

import argparse
import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

WAIT_COLOUR = "#c8c8c8"


def load_events(path):
    with open(path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list (not a Chrome trace)")
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "op"]
    waits = [e for e in events if e.get("ph") == "X" and e.get("cat") == "wait"]
    if not ops:
        raise ValueError(f"{path}: no instruction events")
    return ops, waits, trace.get("otherData", {})


def draw(ops, waits, info, out, width_px=1800):
    lanes = sorted({e["tid"] for e in ops} | {e["tid"] for e in waits})
    row = {tid: i for i, tid in enumerate(lanes)}
    names = sorted({e["name"] for e in ops})
    cmap = plt.get_cmap("tab20", max(len(names), 1))
    colour = {n: cmap(i) for i, n in enumerate(names)}
    height_px = max(400, min(4000, 120 + 14 * len(lanes)))
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    for e in waits:
        ax.broken_barh([(e["ts"], e["dur"])], (row[e["tid"]] - 0.4, 0.8), color=WAIT_COLOUR,
                       linewidth=0)
    spans = collections.defaultdict(list)  # (name, tid) -> bars, one pass over the events
    for e in ops:
        spans[(e["name"], e["tid"])].append((e["ts"], max(e["dur"], 1e-3)))
    for (name, tid), bars in spans.items():
        ax.broken_barh(bars, (row[tid] - 0.4, 0.8), color=colour[name], linewidth=0)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.invert_yaxis()
    step = max(1, len(lanes) // 32)
    ax.set_yticks([row[t] for t in lanes[::step]])
    ax.set_yticklabels([f"SM {t}" for t in lanes[::step]], fontsize=7)
    ax.set_xlabel("µs from the step's first fetch")
    end = max(e["ts"] + e["dur"] for e in ops)
    ax.set_xlim(0, end * 1.01 if end > 0 else 1)
    title = f"step {info.get('step_id', '?')}: {len(ops)} instructions on {len(lanes)} SMs"
    if "num_tokens" in info:
        title += f", {info['num_tokens']} tokens, {info.get('num_requests', '?')} requests"
    ax.set_title(title)
    handles = [Patch(color=colour[n], label=n) for n in names]
    handles.append(Patch(color=WAIT_COLOUR, label="wait"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    fig.tight_layout()
    # Written beside and renamed into place: a reader never sees half a PNG.
    part = out + ".part"
    fig.savefig(part, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(part, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p.add_argument("-o", "--out", default=None,
                   help="PNG path, with one trace (default: TRACE with .png)")
    p.add_argument("--width", type=int, default=1800, help="image width in pixels")
    a = p.parse_args(argv)
    if a.out and len(a.traces) > 1:
        p.error("-o takes one trace")
    failed = 0
    for trace in a.traces:
        out = a.out or (trace[:-5] if trace.endswith(".json") else trace) + ".png"
        try:
            ops, waits, info = load_events(trace)
        except (OSError, ValueError) as e:
            print(f"trace-plot: {e}", file=sys.stderr)
            failed += 1
            continue
        draw(ops, waits, info, out, a.width)
        print(f"trace-plot: {len(ops)} instructions -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
