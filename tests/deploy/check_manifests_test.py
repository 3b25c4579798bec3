"""The manifest checker must catch drift: each broken copy of a rendered overlay is refused for
the reason it was broken, and the overlays as committed pass.

  check_manifests_test.py RENDERED.yaml FLAGS.json
"""
import copy
import json
import os
import sys
import unittest

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import check_manifests  # noqa: E402

RENDERED, FLAGS = sys.argv[1], sys.argv[2]
del sys.argv[1:]


def load():
    with open(RENDERED) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def worker(docs):
    return find(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"][
        "containers"][0]


def coordinator(docs):
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


class CheckManifestsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(FLAGS) as f:
            cls.flags = json.load(f)

    def problems(self, docs):
        out = []
        check_manifests.check(docs, self.flags, out)
        return out

    def assertRefused(self, docs, *fragments):
        problems = self.problems(docs)
        self.assertTrue(problems, "accepted")
        for fragment in fragments:
            self.assertTrue(any(fragment in p for p in problems), f"{fragment!r} not in {problems}")

    def test_committed_overlay_passes(self):
        self.assertEqual(self.problems(load()), [])

    def test_unknown_flag(self):
        docs = load()
        worker(docs)["args"].append("--gpu-count=8")
        self.assertRefused(docs, "gemma-worker has no flag --gpu-count")

    def test_port_nobody_listens_on(self):
        docs = load()
        coordinator(docs)["args"] = [a for a in coordinator(docs)["args"]
                                     if not a.startswith("--http-listen")]
        self.assertRefused(docs, "port 8000 is declared but gemma-coordinator listens on")

    def test_probe_on_an_undeclared_port(self):
        docs = load()
        worker(docs)["readinessProbe"]["grpc"]["port"] = 50099
        self.assertRefused(docs, "readinessProbe uses port 50099")

    def test_undefined_variable(self):
        docs = load()
        worker(docs)["args"].append("--advertise=$(NODE_IP):50061")
        self.assertRefused(docs, "uses $(NODE_IP)")

    def test_unknown_core_field(self):
        docs = load()
        find(docs, "Deployment")["spec"]["replica"] = 2
        self.assertRefused(docs, "Deployment/gemma-coordinator")

    def test_bad_pod_template_inside_the_leaderworkerset(self):
        docs = load()
        worker(docs)["imagePulPolicy"] = "Always"  # a typo of imagePullPolicy
        self.assertRefused(docs, "workerTemplate (as a Pod)")

    def test_leaderworkerset_schema(self):
        docs = load()
        find(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"] = 0
        self.assertRefused(docs, "LeaderWorkerSet/gemma-workers")
        docs = load()
        find(docs, "LeaderWorkerSet")["spec"]["startupPolicy"] = "Whenever"
        self.assertRefused(docs, "Whenever")

    def test_scaledobject_and_servicemonitor_schemas(self):
        docs = load()
        find(docs, "ScaledObject")["spec"]["triggers"] = []
        find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] = "often"
        self.assertRefused(docs, "ScaledObject/gemma-workers", "ServiceMonitor/gemma-coordinator")

    def test_service_targeting_a_port_the_pods_lack(self):
        docs = load()
        find(docs, "Service")["spec"]["ports"][1]["targetPort"] = "metrics"
        self.assertRefused(docs, "targetPort metrics")


if __name__ == "__main__":
    unittest.main()
