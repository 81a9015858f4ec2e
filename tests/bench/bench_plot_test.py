#!/usr/bin/env python3
"""scripts/bench-plot.py renders a small generated megaserve-bench result into a PNG of the
expected size whose six panels each hold plotted (coloured) pixels; with metrics samples the
requests panel shows them, without it falls back to the client's view.

    bench_plot_test.py SCRIPT WORKDIR
"""

import json
import os
import random
import subprocess
import sys
import unittest

import matplotlib.image

SCRIPT = None
WORKDIR = None
EXPECTED_SIZE = (1800, 1000)  # bench-plot.py's FIGSIZE x DPI, width x height
EXPECTED_TITLES = ["Token throughput over time", None, "End-to-end latency CDF", "TTFT CDF",
                   "TPOT CDF", "ITL CDF"]


def generated_result(num_requests=40, with_metrics=False, seed=19):
    """A result as megaserve-bench writes it: Poisson arrivals, a few tokens per message."""
    rng = random.Random(seed)
    r = {"model": {"name": "generated", "backend": "cpu"}, "config": {"request_rate": 20},
         "input_lens": [], "output_lens": [], "errors": [], "ttfts": [], "itls": [],
         "arrival_times": [], "first_token_times": [], "token_times": []}
    t = 0.0
    end = 0.0
    for _ in range(num_requests):
        t += rng.expovariate(20.0)
        first = t + rng.uniform(0.02, 0.3)
        times, itl, now = [first], [], first
        for _ in range(rng.randint(4, 60)):
            gap = rng.uniform(0.005, 0.05)
            now += gap
            itl.append(gap)
            times.append(now)
        r["input_lens"].append(rng.randint(10, 500))
        r["output_lens"].append(len(times))
        r["errors"].append("")
        r["ttfts"].append(first - t)
        r["itls"].append(itl)
        r["arrival_times"].append(t)
        r["first_token_times"].append(first)
        r["token_times"].append(times)
        end = max(end, now)
    # One failed request: no token, an error; the plots leave it out.
    r["input_lens"].append(7)
    r["output_lens"].append(0)
    r["errors"].append("status 14: unavailable")
    r["ttfts"].append(0.0)
    r["itls"].append([])
    r["arrival_times"].append(0.5)
    r["first_token_times"].append(-1.0)
    r["token_times"].append([])
    r["summary"] = {"duration_s": end, "total_token_throughput": 1234.0}
    if with_metrics:
        r["metrics_samples"] = [{"time": 0.1 * k, "running": k % 7, "waiting": k % 3}
                                for k in range(int(end / 0.1) + 1)]
    return r


def render(name, result):
    src = os.path.join(WORKDIR, name + ".json")
    png = os.path.join(WORKDIR, name + ".png")
    panels_json = os.path.join(WORKDIR, name + ".panels.json")
    for path in (png, panels_json):
        if os.path.exists(path):
            os.remove(path)
    with open(src, "w") as f:
        json.dump(result, f)
    subprocess.run([sys.executable, SCRIPT, src, "-o", png, "--panels_json", panels_json],
                   check=True)
    with open(panels_json) as f:
        return png, json.load(f)


def coloured_pixels(image, box):
    """Pixels inside box (x0, y0, x1, y1), frame excluded, that are clearly coloured: plotted
    lines, not the black/grey of frames, ticks, grid and text or the white background."""
    x0, y0, x1, y1 = box
    inner = image[y0 + 3:y1 - 2, x0 + 3:x1 - 2, :3]
    spread = inner.max(axis=2) - inner.min(axis=2)
    return int((spread > 0.25).sum())


class BenchPlotTest(unittest.TestCase):
    def check_report(self, png, panels, requests_title_word):
        self.assertTrue(os.path.getsize(png) > 0, png)
        image = matplotlib.image.imread(png)  # (height, width, RGBA) floats in [0, 1]
        self.assertEqual((image.shape[1], image.shape[0]), EXPECTED_SIZE)
        self.assertEqual(len(panels), 6)
        for panel, expected in zip(panels, EXPECTED_TITLES):
            if expected is not None:
                self.assertEqual(panel["title"], expected)
        self.assertIn(requests_title_word, panels[1]["title"])
        for panel in panels:
            x0, y0, x1, y1 = panel["box"]
            self.assertTrue(0 <= x0 < x1 <= EXPECTED_SIZE[0] and 0 <= y0 < y1 <= EXPECTED_SIZE[1],
                            panel)
            self.assertGreater(x1 - x0, 200, panel)
            self.assertGreater(y1 - y0, 200, panel)
            self.assertGreater(coloured_pixels(image, panel["box"]), 100,
                               f"panel '{panel['title']}' has no plotted pixels")

    def test_report_with_scraped_metrics(self):
        png, panels = render("with_metrics", generated_result(with_metrics=True))
        self.check_report(png, panels, "scraped metrics")

    def test_report_without_metrics_shows_the_client_view(self):
        png, panels = render("without_metrics", generated_result(with_metrics=False))
        self.check_report(png, panels, "Client view")

    def test_an_empty_panel_is_detected(self):
        # The pixel check itself can fail: a result whose requests all failed has nothing to
        # plot in its CDFs.
        result = generated_result(num_requests=0)
        png, panels = render("all_failed", result)
        image = matplotlib.image.imread(png)
        self.assertEqual(coloured_pixels(image, panels[3]["box"]), 0)

    def test_a_result_without_the_timeline_is_refused(self):
        src = os.path.join(WORKDIR, "old.json")
        with open(src, "w") as f:
            json.dump({"input_lens": [1], "ttfts": [0.1]}, f)
        run = subprocess.run([sys.executable, SCRIPT, src, "-o", src + ".png"],
                             capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("token_times", run.stderr)
        self.assertFalse(os.path.exists(src + ".png"))


if __name__ == "__main__":
    SCRIPT, WORKDIR = sys.argv[1], sys.argv[2]
    os.makedirs(WORKDIR, exist_ok=True)
    unittest.main(argv=sys.argv[:1], verbosity=2)
