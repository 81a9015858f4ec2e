#!/usr/bin/env python3
"""docker/Dockerfile cannot be built here (no container engine runs on these machines), so
this checks what can be checked without one: every file or folder it COPYs from the build
context exists in the repository and is not filtered out by its .dockerignore; every COPY
--from names an earlier stage; its RUN steps call the same project scripts that CI's
scripts/test calls (scripts/install-deps, scripts/build), which exist and are executable;
the config its ENTRYPOINT names is in configs/; it EXPOSEs the default config's ports.

    dockerfile_test.py REPO_ROOT
"""

import fnmatch
import glob
import os
import re
import shlex
import sys
import unittest

ROOT = None


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):  # a comment inside a continued instruction
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            full = pending + stripped
            pending = ""
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def scripts_called(text):
    """The project scripts (scripts/NAME) a shell text calls, by NAME."""
    return set(re.findall(r"(?:^|[\s/\"$]|\})scripts/([A-Za-z0-9_.-]+)", text))


class DockerfileTest(unittest.TestCase):
    def setUp(self):
        self.dockerfile = os.path.join(ROOT, "docker", "Dockerfile")
        self.steps = instructions(self.dockerfile)
        self.assertTrue(self.steps, self.dockerfile)

    def ignored_patterns(self):
        path = self.dockerfile + ".dockerignore"
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [l.strip() for l in f if l.strip() and not l.startswith("#")]

    def test_copied_sources_exist_and_are_not_ignored(self):
        stages, copies = [], 0
        ignored = self.ignored_patterns()
        for word, args in self.steps:
            if word == "FROM":
                parts = args.split()
                if len(parts) >= 3 and parts[-2].upper() == "AS":
                    stages.append(parts[-1])
            if word not in ("COPY", "ADD"):
                continue
            parts = shlex.split(args)
            flags = [p for p in parts if p.startswith("--")]
            sources = [p for p in parts if not p.startswith("--")][:-1]
            self.assertTrue(sources, f"{word} {args}")
            from_stage = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if from_stage:
                self.assertIn(from_stage[0], stages, f"{word} {args}: no such earlier stage")
                continue
            for source in sources:
                copies += 1
                matches = glob.glob(os.path.join(ROOT, source))
                self.assertTrue(matches, f"{word} {args}: {source} is not in the repository")
                relative = os.path.normpath(source)
                for pattern in ignored:
                    self.assertFalse(relative != "." and fnmatch.fnmatch(relative, pattern),
                                     f"{source} is excluded by .dockerignore pattern {pattern}")
        self.assertGreater(copies, 0, "the Dockerfile copies nothing from the repository")

    def test_build_steps_call_the_scripts_ci_runs(self):
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            ci = f.read()
        self.assertIn("test", scripts_called(ci), ".ci/run no longer runs scripts/test")
        with open(os.path.join(ROOT, "scripts", "test")) as f:
            ci_scripts = scripts_called(f.read())
        self.assertTrue({"install-deps", "build"} <= ci_scripts, ci_scripts)
        run_text = "\n".join(args for word, args in self.steps if word == "RUN")
        docker_scripts = scripts_called(run_text)
        for name in sorted(ci_scripts):
            self.assertIn(name, docker_scripts,
                          f"CI's scripts/test calls scripts/{name}; the Dockerfile's RUN "
                          "steps do not")
        for name in docker_scripts:
            path = os.path.join(ROOT, "scripts", name)
            self.assertTrue(os.path.isfile(path) and os.access(path, os.X_OK), path)
        # The build goes through scripts/build, not a CMake build of its own.
        self.assertNotIn("cmake --build", run_text)

    def test_entrypoint_config_and_ports(self):
        entry = [args for word, args in self.steps if word == "ENTRYPOINT"]
        self.assertEqual(len(entry), 1)
        config = re.search(r"--config=\S*/share/megaserve/configs/([\w.-]+)", entry[0])
        self.assertTrue(config, entry[0])
        config_path = os.path.join(ROOT, "configs", config.group(1))
        self.assertTrue(os.path.isfile(config_path), config_path)
        with open(config_path) as f:
            text = f.read()
        # Addresses the config sets (a commented-out example, such as the HTTP API's, is off).
        settings = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        ports = set(re.findall(r"_address:\s*\"[^\"]*:(\d+)\"", settings))
        exposed = set()
        for word, args in self.steps:
            if word == "EXPOSE":
                exposed.update(p.split("/")[0] for p in args.split())
        self.assertTrue(ports, config_path)
        self.assertEqual(exposed, ports)


if __name__ == "__main__":
    ROOT = sys.argv[1]
    unittest.main(argv=sys.argv[:1], verbosity=2)
