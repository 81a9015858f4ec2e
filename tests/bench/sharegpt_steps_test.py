#!/usr/bin/env python3
"""scripts/sharegpt-steps.py on hand-made megaserve-bench results: steps found from token
arrivals, bucketed by their token count and by time window, the last step left out; bad
input refused with exit code 2.

    sharegpt_steps_test.py SCRIPT WORKDIR
"""

import json
import os
import subprocess
import sys
import unittest

SCRIPT = None
WORKDIR = None


def run(result, *flags):
    path = os.path.join(WORKDIR, "result.json")
    with open(path, "w") as f:
        json.dump(result, f)
    return subprocess.run([sys.executable, SCRIPT, path, *flags], capture_output=True, text=True)


class SharegptStepsTest(unittest.TestCase):
    def test_steps_buckets_and_windows(self):
        # Request 0 (prompt 10): tokens at 0, 10, 20, 30 ms. Request 1 (prompt 7) joins at
        # 10 ms (its first token) and streams 1 ms after request 0 each time. Request 2
        # (prompt 5) alone at 60 ms, after a 30 ms step. Steps: 0 (1 token), 10, 20, 30 (2 each),
        # 60 (1, the last: left out).
        result = {"input_lens": [10, 7, 5],
                  "token_times": [[0.000, 0.010, 0.020, 0.030],
                                  [0.011, 0.021, 0.031],
                                  [0.060]]}
        out = run(result, "--json", "--windows=2")
        self.assertEqual(out.returncode, 0, out.stderr)
        s = json.loads(out.stdout)
        self.assertEqual(s["steps"], 5)
        self.assertAlmostEqual(s["span_s"], 0.060)
        by = {r["tokens_from"]: r for r in s["by_tokens"]}
        self.assertEqual(sorted(by), [1, 2])
        self.assertEqual(by[1]["steps"], 1)
        self.assertAlmostEqual(by[1]["mean_step_ms"], 10.0)
        self.assertEqual((by[1]["first_tokens"], by[1]["prompt_tokens"]), (1, 10))
        self.assertEqual(by[2]["steps"], 3)
        self.assertAlmostEqual(by[2]["seconds"], 0.050)
        self.assertEqual((by[2]["first_tokens"], by[2]["prompt_tokens"]), (1, 7))
        self.assertEqual(by[2]["tokens_to"], 3)
        w0, w1 = s["by_window"]
        # Windows of 30 ms: steps at 0, 10, 20 ms, then the one at 30 ms.
        self.assertEqual((w0["steps"], w1["steps"]), (3, 1))
        self.assertAlmostEqual(w0["mean_tokens"], 5 / 3)
        self.assertAlmostEqual(w1["seconds"], 0.030)

    def test_a_wider_gap_merges_steps(self):
        # Arrivals at 0, 2, 5 and 100 ms: gaps of 2, 3 and 95 ms.
        result = {"input_lens": [1, 1], "token_times": [[0.0, 0.005, 0.100], [0.002]]}
        narrow = json.loads(run(result, "--json").stdout)
        wide = json.loads(run(result, "--json", "--gap_ms=5").stdout)
        self.assertEqual(narrow["steps"], 3)
        self.assertEqual(wide["steps"], 2)

    def test_the_table_prints(self):
        result = {"input_lens": [3], "token_times": [[0.0, 0.01, 0.02]]}
        out = run(result)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("3 steps over 0.02 s", out.stdout)
        self.assertIn("tokens/step", out.stdout)

    def test_bad_input_is_refused(self):
        self.assertEqual(run({"token_times": []}).returncode, 2)
        self.assertEqual(run({"summary": {}}).returncode, 2)
        out = run({"token_times": [[0.0]]}, "--gap_ms=0")
        self.assertEqual(out.returncode, 2)
        self.assertIn("--gap_ms", out.stderr)
        missing = subprocess.run([sys.executable, SCRIPT, os.path.join(WORKDIR, "none.json")],
                                 capture_output=True, text=True)
        self.assertEqual(missing.returncode, 2)


if __name__ == "__main__":
    SCRIPT, WORKDIR = sys.argv[1], sys.argv[2]
    os.makedirs(WORKDIR, exist_ok=True)
    unittest.main(argv=sys.argv[:1])
