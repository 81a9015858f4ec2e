#!/usr/bin/env python3
"""scripts/trace-plot.py draws a step timeline (Chrome trace JSON as chrome_trace_json writes
it) into a PNG: the requested width, one row per SM lane with coloured pixels where that lane
ran instructions, grey where it waited; several traces in one run each get their PNG (as the
server's step capture runs it); a file that is not a trace is refused.

    trace_plot_test.py SCRIPT WORKDIR
"""

import json
import os
import subprocess
import sys
import unittest

import matplotlib.image

SCRIPT = None
WORKDIR = None


def trace(lanes, per_lane=12):
    events = []
    for tid in lanes:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"name": f"SM {tid}"}})
        t = 0.0
        for i in range(per_lane):
            wait = 2.0 if i % 3 == 0 else 0.0
            if wait:
                events.append({"name": "wait", "cat": "wait", "ph": "X", "ts": t, "dur": wait,
                               "pid": 0, "tid": tid})
            t += wait
            name = ["kQkvRope", "kAttention", "kOProj"][i % 3]
            events.append({"name": name, "cat": "op", "ph": "X", "ts": t, "dur": 5.0 + tid,
                           "pid": 0, "tid": tid, "args": {"layer": 0}})
            t += 5.0 + tid
    return {"traceEvents": events, "otherData": {"step_id": 3, "num_tokens": 40,
                                                   "num_requests": 2}}


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


class TracePlotTest(unittest.TestCase):
    def test_every_lane_has_bars_and_the_image_has_the_width(self):
        lanes = [0, 1, 2, 5]
        path = os.path.join(WORKDIR, "trace.json")
        with open(path, "w") as f:
            json.dump(trace(lanes), f)
        out = os.path.join(WORKDIR, "trace.png")
        r = run(path, "-o", out, "--width", "1200")
        self.assertEqual(r.returncode, 0, r.stderr)
        img = matplotlib.image.imread(out)
        self.assertEqual(img.shape[1], 1200)
        # Coloured pixels (not grey, not white) per horizontal band of the plot area: the
        # lanes are drawn top to bottom in tid order, so each quarter of the bar area holds a
        # lane's bars.
        rgb = img[..., :3]
        coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.15
        rows = coloured.any(axis=1).nonzero()[0]
        self.assertGreater(len(rows), 0)
        top, bottom = rows.min(), rows.max()
        # The legend sits below the bars; bars occupy the rows above the legend's rows.
        bar_rows = [y for y in range(top, bottom + 1) if coloured[y].sum() > 50]
        bands = []
        for y in bar_rows:
            if bands and y - bands[-1][1] <= 1:
                bands[-1][1] = y
            else:
                bands.append([y, y])
        self.assertGreaterEqual(len(bands), len(lanes), f"bands {bands}")
        grey = (abs(rgb - 200 / 255).max(axis=2) < 0.02).sum()
        self.assertGreater(grey, 100, "waits are not shaded")

    def test_several_traces_each_get_their_png(self):
        paths = []
        for step, lanes in ((4, [0, 1]), (5, [0, 1, 2])):
            path = os.path.join(WORKDIR, f"step-{step:06d}.trace.json")
            with open(path, "w") as f:
                json.dump(trace(lanes, per_lane=4), f)
            paths.append(path)
        r = run(*paths, "--width", "900")
        self.assertEqual(r.returncode, 0, r.stderr)
        for path in paths:
            png = path[:-5] + ".png"
            img = matplotlib.image.imread(png)
            self.assertEqual(img.shape[:2], (400, 900), png)  # few lanes: the minimum height
            rgb = img[..., :3]
            self.assertGreater(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.15).sum(), 1000,
                               f"{png} has no coloured bars")
            self.assertFalse(os.path.exists(png + ".part"))
        r = run(*paths, "-o", os.path.join(WORKDIR, "one.png"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("-o takes one trace", r.stderr)

    def test_a_file_that_is_not_a_trace_is_refused(self):
        path = os.path.join(WORKDIR, "not_a_trace.json")
        with open(path, "w") as f:
            json.dump({"hello": 1}, f)
        r = run(path)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no traceEvents", r.stderr)


if __name__ == "__main__":
    SCRIPT, WORKDIR = sys.argv[1], sys.argv[2]
    os.makedirs(WORKDIR, exist_ok=True)
    unittest.main(argv=sys.argv[:1])
