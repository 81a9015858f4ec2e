#!/usr/bin/env python3
"""deploy/kubernetes/: every manifest validates against the Kubernetes schemas offline
(kubernetes-validate from PyPI, strict: unknown fields are errors), and the manifests agree
with the server: gRPC probes on the --grpc_address port, Prometheus annotations on the
--metrics_address port, a termination grace that covers preStop plus drain_grace_seconds,
Services that select the Deployment's pods.

    kubernetes_manifests_test.py REPO_ROOT
"""

import glob
import os
import re
import subprocess
import sys
import tempfile
import unittest

import yaml  # PyYAML, a dependency of kubernetes-validate

ROOT = None


def validate(path):
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                           path], capture_output=True, text=True)


def manifests():
    paths = sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml")))
    docs = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return paths, docs


def default_config_value(field):
    with open(os.path.join(ROOT, "configs", "default.textproto")) as f:
        text = f.read()
    match = re.search(r"^\s*%s:\s*\"?([^\"\s]+)\"?" % field, text, re.MULTILINE)
    assert match, f"configs/default.textproto has no {field}"
    return match.group(1)


def flag(container, name, field):
    """The value of --name in the container's args, else the default config's field."""
    for arg in container.get("args", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default_config_value(field)


class KubernetesManifestsTest(unittest.TestCase):
    def setUp(self):
        self.paths, self.docs = manifests()
        self.deployment = self.docs[("Deployment", "megaserve")]
        self.pod = self.deployment["spec"]["template"]
        self.container = self.pod["spec"]["containers"][0]

    def test_every_manifest_validates(self):
        self.assertGreaterEqual(len(self.paths), 3)
        for path in self.paths:
            run = validate(path)
            self.assertEqual(run.returncode, 0, f"{path}:\n{run.stdout}{run.stderr}")

    def test_the_validator_rejects_an_unknown_field(self):
        with open(os.path.join(ROOT, "deploy", "kubernetes", "deployment.yaml")) as f:
            text = f.read()
        broken = text.replace("periodSeconds:", "periodSecs:", 1)
        self.assertNotEqual(broken, text)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(broken)
            f.flush()
            run = validate(f.name)
        self.assertNotEqual(run.returncode, 0, run.stdout)
        self.assertIn("periodSecs", run.stdout + run.stderr)

    def test_probes_use_grpc_health_on_the_grpc_port(self):
        grpc_port = int(flag(self.container, "grpc_address", "grpc_address").rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports["grpc"], grpc_port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            self.assertEqual(self.container[probe]["grpc"]["port"], grpc_port, probe)
            self.assertEqual(self.container[probe]["grpc"].get("service", ""), "", probe)

    def test_termination_grace_covers_prestop_and_the_drain(self):
        drain = int(flag(self.container, "drain_grace_seconds", "drain_grace_seconds"))
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        pre_stop = int(command[1])
        grace = self.pod["spec"]["terminationGracePeriodSeconds"]
        self.assertGreaterEqual(grace, pre_stop + drain + 5,
                                f"preStop {pre_stop} s + drain {drain} s + 5 s to exit")
        # A draining server answers NOT_SERVING; liveness must not restart it mid-drain.
        liveness = self.container["livenessProbe"]
        self.assertGreater(liveness["periodSeconds"] * liveness["failureThreshold"], drain)

    def test_gpu_and_prometheus_annotations(self):
        self.assertGreaterEqual(int(self.container["resources"]["limits"]["nvidia.com/gpu"]), 1)
        metrics_port = int(flag(self.container, "metrics_address",
                                "metrics_address").rsplit(":", 1)[1])
        annotations = self.pod["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true")
        self.assertEqual(int(annotations["prometheus.io/port"]), metrics_port)
        self.assertEqual(annotations["prometheus.io/path"], "/metrics")
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports["metrics"], metrics_port)

    def test_services_select_the_pods_and_target_named_ports(self):
        labels = self.pod["metadata"]["labels"]
        self.assertEqual(self.deployment["spec"]["selector"]["matchLabels"], labels)
        port_names = {p["name"] for p in self.container["ports"]}
        service = self.docs[("Service", "megaserve")]
        headless = self.docs[("Service", "megaserve-headless")]
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertNotEqual(service["spec"].get("clusterIP"), "None")
        for svc in (service, headless):
            for key, value in svc["spec"]["selector"].items():
                self.assertEqual(labels.get(key), value, svc["metadata"]["name"])
            self.assertIn("grpc", [p["targetPort"] for p in svc["spec"]["ports"]])
            for p in svc["spec"]["ports"]:
                self.assertIn(p["targetPort"], port_names, svc["metadata"]["name"])


if __name__ == "__main__":
    ROOT = sys.argv[1]
    unittest.main(argv=sys.argv[:1], verbosity=2)
