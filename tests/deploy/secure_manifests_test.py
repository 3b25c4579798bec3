"""The cpu overlay as Kubernetes would run it, on loopback: Secrets from
scripts/make_cluster_secrets.sh, the coordinator and a worker started with exactly the arguments
the rendered manifests give them (addresses moved to 127.0.0.1, each mounted Secret read from
the folder the script wrote for it). The worker must join over mutual TLS with the one
certificate every pod shares, gemmactl and the official OpenAI client must get answers with the
CA and a token, and nothing may get in without them. The coordinator answers its probes as the
kubelet sends them (no token, no certificate check).

  secure_manifests_test.py BUILD_DIR
"""
import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(sys.argv[1])
del sys.argv[1:]
BIN = os.path.join(BUILD, "bin")
NAMESPACE = "gemma-demo"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container(obj):
    spec = (obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
            if obj["kind"] == "LeaderWorkerSet" else obj["spec"]["template"]["spec"])
    return spec, spec["containers"][0]


def secret_mounts(spec, c, secrets_dir):
    """mountPath -> the folder make_cluster_secrets.sh wrote for that volume's Secret."""
    by_volume = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    return {m["mountPath"]: os.path.join(secrets_dir, by_volume[m["name"]])
            for m in c["volumeMounts"] if m["name"] in by_volume}


class SecureManifestsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="secure_manifests_")
        cls.procs = []
        cls.secrets = os.path.join(cls.dir, "secrets")
        subprocess.run([os.path.join(REPO, "scripts", "make_cluster_secrets.sh"), "--namespace",
                        NAMESPACE, cls.secrets], check=True, capture_output=True)
        rendered = subprocess.run(
            ["kubectl", "kustomize", os.path.join(REPO, "deploy", "k8s", "overlays", "cpu")],
            check=True, capture_output=True, text=True).stdout
        cls.docs = [d for d in yaml.safe_load_all(rendered) if d]

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            if p.poll() is None:
                p.terminate()
        for p in cls.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def find(self, kind):
        return next(d for d in self.docs if d["kind"] == kind)

    def start(self, name, argv):
        with open(os.path.join(self.dir, name + ".log"), "w") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def log(self, name):
        with open(os.path.join(self.dir, name + ".log")) as f:
            return f.read()

    def gemmactl(self, *args, token=True, ca=True):
        argv = [os.path.join(BIN, "gemmactl"), "--coordinator", self.public,
                "--connect-timeout-ms", "2000"]
        if ca:
            argv.append("--tls-ca=" + os.path.join(self.secrets, "ca.crt"))
        if token:
            argv.append("--token=" + self.token("admin"))
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60)

    def token(self, who):
        with open(os.path.join(self.secrets, who + ".token")) as f:
            return f.read().strip()

    def test_the_rendered_manifests_run_secure_with_the_generated_secrets(self):
        # The Secrets validate and carry the files the pods mount.
        with open(os.path.join(self.secrets, "secrets.yaml")) as f:
            secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(f) if d}
        self.assertEqual(sorted(secrets), ["gemma-auth", "gemma-coordinator-internal",
                                           "gemma-coordinator-tls", "gemma-worker-tls"])
        for name, obj in secrets.items():
            self.assertEqual(obj["metadata"]["namespace"], NAMESPACE)
            for key, data in obj["data"].items():
                with open(os.path.join(self.secrets, name, key), "rb") as f:
                    self.assertEqual(base64.b64decode(data), f.read(), f"{name}/{key}")

        self.public = f"127.0.0.1:{free_port()}"
        internal = f"127.0.0.1:{free_port()}"
        http = f"127.0.0.1:{free_port()}"
        replica = f"127.0.0.1:{free_port()}"
        health = f"127.0.0.1:{free_port()}"
        data_dir = os.path.join(self.dir, "data")
        os.makedirs(data_dir)

        # The coordinator exactly as the Deployment runs it, but on loopback.
        spec, c = container(self.find("Deployment"))
        mounts = secret_mounts(spec, c, self.secrets)
        moved = {"--listen": self.public, "--internal-listen": internal, "--http-listen": http,
                 "--data-dir": data_dir}
        argv = [os.path.join(BIN, c["command"][0])]
        for arg in c["args"]:
            flag, _, value = arg.partition("=")
            value = moved.get(flag, value)
            for path, folder in mounts.items():
                value = value.replace(path, folder)
            argv.append(f"{flag}={value}" if value else flag)
        self.assertNotIn("--insecure", argv)
        self.start("coordinator", argv)

        # A worker exactly as the LeaderWorkerSet runs it, its $(VARS) as the pod would have them.
        spec, c = container(self.find("LeaderWorkerSet"))
        # Its gRPC probes (plaintext, as the kubelet's are) ask the --health-listen port, whose
        # answers auth_test's MutualTlsTest checks; readiness asks for loaded ranks.
        health_port = next(int(a.rpartition(":")[2]) for a in c["args"]
                           if a.startswith("--health-listen="))
        self.assertEqual(c["readinessProbe"]["grpc"]["port"], health_port)
        self.assertEqual(c["readinessProbe"]["grpc"]["service"], "gemma.worker.Ready")
        self.assertEqual(c["livenessProbe"]["grpc"]["port"], health_port)
        mounts = secret_mounts(spec, c, self.secrets)
        env = {"POD_IP": "127.0.0.1", "LWS_NAME": "gemma-workers", "LWS_GROUP_INDEX": "0",
               "LWS_GROUP_SIZE": "1", "LWS_WORKER_INDEX": "0"}
        moved = {"--listen": replica, "--advertise": replica, "--health-listen": health,
                 "--coordinator": internal,
                 "--model": os.path.join(REPO, "tests", "golden", "data", "kjv-moe")}
        argv = [os.path.join(BIN, c["command"][0])]
        for arg in c["args"]:
            arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
            flag, _, value = arg.partition("=")
            self.assertNotEqual(flag, "--insecure")
            value = moved.get(flag, value)
            for path, folder in mounts.items():
                value = value.replace(path, folder)
            argv.append(f"{flag}={value}" if value else flag)
        worker = self.start("worker", argv)

        started = time.time()
        deadline = started + 90
        status = None
        while time.time() < deadline:
            status = self.gemmactl("status", "--json")
            if status.returncode == 0 and '"healthy":true' in status.stdout:
                break
            self.assertIsNone(worker.poll(), self.log("worker"))
            time.sleep(0.5)
        self.assertIn('"healthy":true', status.stdout if status else "",
                      self.log("worker") + self.log("coordinator"))
        print(f"healthy after {time.time() - started:.1f} s", file=sys.stderr)

        # The coordinator's probes as the kubelet sends them: the manifest's scheme and path on
        # the HTTP port, no token, the certificate not verified; 200 to 399 is success.
        spec, c = container(self.find("Deployment"))
        http_port = next(p["containerPort"] for p in c["ports"] if p.get("name") == "http")
        for kind in ("readinessProbe", "livenessProbe"):
            get = c[kind]["httpGet"]
            self.assertIn(get["port"], (http_port, "http"), kind)
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            url = f"{get.get('scheme', 'HTTP').lower()}://{http}{get['path']}"
            with urllib.request.urlopen(url, context=unverified, timeout=10) as probe:
                self.assertTrue(200 <= probe.status < 400, f"{kind} {url}: {probe.status}")

        generated = self.gemmactl("generate", "In the beginning", "--max-tokens", "8")
        self.assertEqual(generated.returncode, 0, generated.stderr)
        self.assertTrue(generated.stdout.strip())

        # Without the token, or without the CA, gemmactl gets nothing.
        no_token = self.gemmactl("status", token=False)
        self.assertNotEqual(no_token.returncode, 0)
        no_ca = self.gemmactl("status", ca=False)
        self.assertNotEqual(no_ca.returncode, 0)

        # The official OpenAI client over HTTPS with the CA and the user token.
        import openai
        context = ssl.create_default_context(cafile=os.path.join(self.secrets, "ca.crt"))
        client = openai.OpenAI(base_url=f"https://{http}/v1", api_key=self.token("user"),
                               max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=context))
        reply = client.completions.create(model="kjv-moe", prompt="In the beginning",
                                          max_tokens=4)
        self.assertTrue(reply.choices[0].text)
        with self.assertRaises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"https://{http}/v1/models", context=context, timeout=10)
        self.assertEqual(anonymous.exception.code, 401)


if __name__ == "__main__":
    unittest.main()
