#!/usr/bin/env python3
"""Soak test (not run in CI): a real cluster on this machine under mixed traffic and random
faults for a few minutes, then an account of every request sent.

  soak.py [--minutes M] [--clients C] [--fault-interval MIN MAX] [--faults KIND,...]
          [--batch-every S] [--deadline-s S] [--json-out FILE] [--keep-logs] [--seed N]

The cluster: gemma-coordinator (--heartbeat-timeout-ms 1500, a data dir for batches) and three
gemma-workers of tests/golden/data/tiny-moe (1, 1 and 2 CPU ranks; --workers), on free
127.0.0.1 ports, each started as the leader of its own process group. A process manager thread
restarts a worker whenever its supervisor exits (after killing whatever is left of its group).
The binaries of build/bin (--build-dir) are copied to the log directory first and run from
there, so that a rebuild during the soak does not swap them under it.

References, before any fault, for each prompt and max_tokens: the ids of gemma-generate (one
gRPC stream through the cluster must equal them, else the run stops), and the text,
completion_tokens and finish_reason of one streamed and one unstreamed HTTP completion.

Traffic: C client threads (default 6) send one request after another, each a random prompt
and max_tokens (16..200, greedy), through `gemmactl generate --json` (gRPC) or the official
openai client's streamed completions (HTTP), chosen at random; after an error a client waits
0.5-1.5 s before its next request. Every --batch-every seconds (the first after 15 s) an OpenAI
batch of --batch-items completions goes through `gemmactl batch submit`, `status` and
`results`: each custom_id must come back exactly once, with the reference text.

Faults, one every MIN..MAX seconds (default 10..30), each once the cluster is whole again
(every worker up and its replica healthy, or 30 s passed):
  kill-rank         SIGKILL one rank process of a worker (its supervisor then exits non-zero)
  kill-worker       SIGKILL a worker's supervisor (its ranks go with it)
  stop-worker       SIGSTOP a worker's process group for --stop-s seconds (3), then SIGCONT
  term-worker       SIGTERM a worker's supervisor: it drains and exits 0, then is restarted
  kill-coordinator  SIGKILL the coordinator, restart it 1-2 s later on the same ports and data
                    dir (the workers register again on their own)

Every request ends as exactly one of:
  completed  its output equals the reference
  failed     an error reached the client, with the output so far a prefix of the reference:
             "coordinator down" (the request overlapped a coordinator outage: expected),
             "refused" (RESOURCE_EXHAUSTED / 429, or no healthy replica) or "other"
  wrong      its output is not the reference (or, when it failed, not a prefix of it), or its
             stream ended with neither an error nor a finish outside a coordinator outage;
             "duplicated" (a subset): repeated or extra tokens against the reference
  lost       no end within --deadline-s (hung)
Completed requests that took over 5 s are logged as slow. Anomalies are logged and listed: a
worker exit no fault explains (or a drain not exiting 0), rank processes outliving their
supervisor, the cluster not whole 30 s after a fault.

Prints progress every 10 s, then a summary table (totals by API, latency, per fault kind the
requests that went wrong in the 15 s after it, batches, restarts, anomalies), writes it as JSON
with --json-out, and exits 1 when a request was lost or wrong, a batch item went missing,
twice or wrong, a process was left behind, or the cluster was not whole again at the end (130
when interrupted with nothing wrong so far). Logs go to a temporary directory printed at the
start (soak.log: every fault and process event with its time; requests.jsonl: every request
not completed; one log per server, appended to across restarts; the binaries when the run
failed), removed at the end unless --keep-logs or the run failed. Every process started here
is stopped on exit, Ctrl-C included, and none may be left.

Run through scripts/soak.sh, which picks .venv-test's interpreter (scripts/python_env.sh).
"""

import argparse
import collections
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

try:
    import openai
except ImportError:
    sys.exit("soak.py: the openai package is missing; run scripts/python_env.sh and use "
             "scripts/soak.sh (it runs .venv-test/bin/python)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[2, 17, 301], [2, 5, 9, 44], [2, 100, 200], [2, 7], [2, 400, 12], [2, 9, 8, 7, 6, 5]]
MAX_TOKENS = [16, 48, 120, 200]
FAULTS = ["kill-rank", "kill-worker", "stop-worker", "term-worker", "kill-coordinator"]
FAIL_REASONS = ["coordinator down", "refused", "other"]
ATTRIBUTION_S = 15  # a request that goes wrong this soon after a fault is counted against it
SLOW_S = 5          # a completed request that took longer is logged (and counted) as slow

parser = argparse.ArgumentParser(
    description="Soak test: a local cluster under mixed traffic and random faults.",
    epilog="See the top of scripts/soak.py for what is counted and how.")
parser.add_argument("--minutes", type=float, default=10, help="traffic duration (default 10)")
parser.add_argument("--clients", type=int, default=6, help="concurrent client threads (6)")
parser.add_argument("--fault-interval", type=float, nargs=2, default=[10, 30],
                    metavar=("MIN", "MAX"), help="seconds between faults (default 10 30)")
parser.add_argument("--faults", default=",".join(FAULTS),
                    help="comma-separated fault kinds to draw from, or none (default: all)")
parser.add_argument("--stop-s", type=float, default=3, help="SIGSTOP duration (default 3)")
parser.add_argument("--workers", default="1,1,2",
                    help="CPU ranks of each worker, comma-separated (default 1,1,2)")
parser.add_argument("--batch-every", type=float, default=120,
                    help="seconds between batches, the first after 15 s (0: none; default 120)")
parser.add_argument("--batch-items", type=int, default=8, help="items per batch (default 8)")
parser.add_argument("--deadline-s", type=float, default=120,
                    help="a request (or batch) with no end after this long is lost (default 120)")
parser.add_argument("--seed", type=int, default=None, help="random seed (default: from time)")
parser.add_argument("--json-out", default="", help="write the summary as JSON to this file")
parser.add_argument("--keep-logs", action="store_true", help="keep the log directory")
parser.add_argument("--build-dir", default=os.path.join(ROOT, "build"),
                    help="where bin/ holds the binaries (default build)")
parser.add_argument("--model", default=os.path.join(ROOT, "tests/golden/data/tiny-moe"),
                    help="checkpoint directory (default tests/golden/data/tiny-moe)")
args = parser.parse_args()
FAULT_KINDS = [] if args.faults in ("", "none") else args.faults.split(",")
for kind in FAULT_KINDS:
    if kind not in FAULTS:
        parser.error(f"unknown fault '{kind}' (known: {', '.join(FAULTS)})")
WORKER_RANKS = [int(r) for r in args.workers.split(",")]
args.model = os.path.abspath(args.model)
if args.seed is None:
    args.seed = int(time.time()) % 100000
TOOLS = ("gemma-coordinator", "gemma-worker", "gemmactl", "gemma-generate")
for tool in TOOLS:
    if not os.access(os.path.join(args.build_dir, "bin", tool), os.X_OK):
        sys.exit(f"soak.py: {args.build_dir}/bin/{tool} is missing; run scripts/build.sh")

START = time.monotonic()
LOG_DIR = tempfile.mkdtemp(prefix="gemma-soak.")
# The binaries run from a copy, so that a rebuild during the soak changes nothing mid-run (every
# restart runs the same version, and no exec meets a half-written file).
BIN = os.path.join(LOG_DIR, "bin")
os.mkdir(BIN)
for tool in TOOLS:
    shutil.copy2(os.path.join(args.build_dir, "bin", tool), BIN)
GEMMACTL = os.path.join(BIN, "gemmactl")
LOG_LOCK = threading.Lock()
LOG_FILE = open(os.path.join(LOG_DIR, "soak.log"), "a", buffering=1)


def since():
    return time.monotonic() - START


def log(msg):
    """One line to stdout and soak.log: wall time, seconds since the start, the message."""
    line = f"{datetime.datetime.now():%H:%M:%S.%f}"[:-3] + f" +{since():7.1f}s  {msg}"
    with LOG_LOCK:
        print(line, flush=True)
        LOG_FILE.write(line + "\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes ----------------------------------------------------------------------------------

CHILDREN = []            # every process started here not yet seen ended (Popen)
PGIDS = set()            # their process groups, for the final check that nothing is left
PGIDS_LOCK = threading.Lock()
STOPPING = threading.Event()  # set once the shutdown begins: nothing new is started


def killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def proc_stat(pid):
    """(ppid, pgid, state) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return None
    fields = line[line.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), fields[0]


def group_members(pgids):
    """Pids alive (zombies excluded) in the given process groups that run one of our
    executables (a group id may be reused once its group is empty)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st and st[1] in pgids and st[2] != "Z":
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if f.read().startswith(BIN.encode() + b"/"):
                            found.append(int(name))
                except OSError:
                    pass
    return found


def spawn(argv, **kwargs):
    """Popen as the leader of a new session (so its whole group can be signalled), recorded
    for the final check that nothing is left; None once the shutdown has begun."""
    with PGIDS_LOCK:
        if STOPPING.is_set():
            return None
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=ROOT, **kwargs)
        PGIDS.add(proc.pid)
        CHILDREN[:] = [p for p in CHILDREN if p.returncode is None] + [proc]
        return proc


def kill_children():
    """SIGKILL the process groups of the children still running (a child not yet reaped keeps
    its pid, so no other process is signalled)."""
    with PGIDS_LOCK:
        running = [p for p in CHILDREN if p.poll() is None]
    for p in running:
        killpg(p.pid, signal.SIGKILL)


def gemmactl(coordinator, *argv, timeout=30):
    """A short gemmactl call (connect timeout 1 s): (exit code, stdout, stderr); -1 when it
    timed out or the shutdown has begun."""
    proc = spawn([GEMMACTL, "--coordinator", coordinator, "--connect-timeout-ms", "1000",
                  *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc is None:
        return -1, "", "shutting down"
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -1, "", "timed out"


class Server:
    """One server process (the coordinator or a worker's supervisor), restartable; its log is
    appended to across restarts, each start marked."""

    def __init__(self, name, argv):
        self.name, self.argv = name, argv
        self.log_path = os.path.join(LOG_DIR, f"{name}.log")
        self.proc = None
        self.starts = 0
        self.log_offset = 0     # where the current start's output begins in the log
        self.expect_exit = None  # the fault it was dealt that should make it exit
        self.stopped = False     # SIGSTOPped now

    def start(self):
        """Starts it (again); False once the shutdown has begun."""
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"==== soak: start {self.starts} at {datetime.datetime.now()}\n".encode())
            f.flush()
            self.log_offset = f.tell()
            self.proc = spawn(self.argv, stdout=f, stderr=subprocess.STDOUT)
        return self.proc is not None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ranks(self):
        """The rank processes (children) of a worker's supervisor."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except (OSError, TypeError):
            return []

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def address(self):
        """The replica address this start of a worker serves on, once it says so."""
        m = re.findall(r"replica serving on (\S+?),? ", self.log_text())
        return m[-1] if m else None


class Cluster:
    def __init__(self):
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.lock = threading.RLock()   # held while a process is signalled, reaped or started
        self.coordinator = Server("coordinator", [
            os.path.join(BIN, "gemma-coordinator"), "--listen", self.grpc,
            "--http-listen", self.http, "--insecure", "--heartbeat-timeout-ms", "1500",
            "--data-dir", os.path.join(LOG_DIR, "data")])
        self.workers = []
        for i, ranks in enumerate(WORKER_RANKS):
            argv = [os.path.join(BIN, "gemma-worker"), "--coordinator", self.grpc,
                    "--model", args.model, "--listen", "127.0.0.1:0", "--threads", "1"]
            if ranks > 1:
                argv += ["--cpu-ranks", str(ranks)]
            self.workers.append(Server(f"w{i + 1}", argv))
        self.coordinator_down = False   # killed on purpose, not yet restarted
        self.outages = []               # [killed at, serving again at (None: not yet)]
        self.worker_restarts = 0
        self.coordinator_restarts = 0
        self.anomalies = []             # what a process did that it should not have

    def anomaly(self, msg):
        self.anomalies.append({"t": round(since(), 1), "what": msg})
        log(f"ANOMALY {msg}")

    def status(self):
        """`gemmactl status --json` as a dict, or None when the coordinator does not answer."""
        rc, out, _ = gemmactl(self.grpc, "status", "--json", timeout=10)
        try:
            return json.loads(out) if rc == 0 else None
        except ValueError:
            return None

    def whole(self):
        """The coordinator serves, every worker runs and its replica is healthy."""
        if self.coordinator_down or not self.coordinator.alive():
            return False
        st = self.status()
        if st is None:
            return False
        healthy = {r.get("address") for r in st.get("replicas", []) if r.get("healthy")}
        return all(w.alive() and not w.stopped and w.address() in healthy
                   for w in self.workers)

    def wait_whole(self, timeout, stop=STOPPING):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not STOPPING.is_set() and not stop.is_set():
            if self.whole():
                return True
            time.sleep(0.3)
        return False

    def start(self):
        self.coordinator.start()
        for w in self.workers:
            w.start()
        log(f"coordinator {self.grpc} (HTTP {self.http}, pid {self.coordinator.pid}); workers "
            + ", ".join(f"{w.name} pid {w.pid} ({r} rank{'s' if r > 1 else ''})"
                        for w, r in zip(self.workers, WORKER_RANKS)))
        if not self.wait_whole(120):
            raise RuntimeError("the cluster did not come up within 120 s (see the server logs)")
        log("cluster up: " + ", ".join(f"{w.name} at {w.address()}" for w in self.workers))

    # The process manager: restarts a worker whose supervisor exited (and the coordinator, should
    # it exit by itself); an exit no fault explains is an anomaly.
    def manage(self):
        while not STOPPING.wait(0.2):
            for w in self.workers:
                with self.lock:
                    if STOPPING.is_set() or w.proc is None or w.alive():
                        continue
                    self.reap_and_restart(w)
            with self.lock:
                c = self.coordinator
                if not STOPPING.is_set() and not self.coordinator_down and not c.alive():
                    self.anomaly(f"coordinator (pid {c.pid}) exited by itself "
                                 f"(code {c.proc.returncode}); restarting it")
                    self.outages.append([since(), None])
                    c.start()
                    self.coordinator_restarts += 1
                    threading.Thread(target=self.mark_serving, daemon=True).start()

    def reap_and_restart(self, w):
        rc, why = w.proc.returncode, w.expect_exit
        w.expect_exit = None
        log(f"{w.name} (pid {w.pid}) exited with {describe_rc(rc)}"
            + (f" after {why}" if why else ""))
        if why is None:
            self.anomaly(f"{w.name} (pid {w.pid}) exited by itself with {describe_rc(rc)}")
        elif why == "term-worker" and rc != 0:
            self.anomaly(f"{w.name} (pid {w.pid}) drained on SIGTERM but exited with "
                         f"{describe_rc(rc)}, not 0")
        elif why == "kill-rank" and rc == 0:
            self.anomaly(f"{w.name} (pid {w.pid}) exited 0 after a rank was killed")
        # Its rank processes should go with it; anything still in its group after 3 s is left
        # behind (then killed, as a process manager would).
        deadline = time.monotonic() + 3
        while group_members({w.pid}) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_members({w.pid})
        if left:
            self.anomaly(f"{w.name}: processes {left} outlived their supervisor {w.pid} by 3 s")
            killpg(w.pid, signal.SIGKILL)
        old = w.pid
        if w.start():
            self.worker_restarts += 1
            log(f"{w.name} restarted: pid {w.pid} (was {old})")

    def mark_serving(self):
        """Ends the open coordinator outage once the restarted coordinator answers."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not STOPPING.is_set():
            if self.status() is not None:
                with self.lock:
                    for o in self.outages:
                        if o[1] is None:
                            o[1] = since()
                            log(f"coordinator serving again ({o[1] - o[0]:.1f} s after it "
                                "went down)")
                return
            time.sleep(0.1)
        self.anomaly("the restarted coordinator did not answer within 60 s")

    def overlaps_outage(self, t0, t1):
        with self.lock:
            return any(t0 <= (up if up is not None else float("inf")) and t1 >= down
                       for down, up in self.outages)

    def stop(self, timeout=10):
        """SIGCONT everything, SIGTERM the workers then the coordinator (SIGKILL after timeout
        seconds; the workers get a second SIGTERM after 2 s, which leaves at once)."""
        with self.lock:
            servers = [s for s in self.workers + [self.coordinator] if s.proc is not None]
        for s in servers:
            killpg(s.pid, signal.SIGCONT)
        for group in (self.workers, [self.coordinator]):
            procs = [s for s in group if s.proc is not None]
            for s in procs:
                if s.alive():
                    s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            termed_twice = False
            while time.monotonic() < deadline and any(s.alive() for s in procs):
                if not termed_twice and time.monotonic() > deadline - timeout + 2:
                    termed_twice = True
                    for s in procs:
                        if s.alive():
                            s.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
            for s in procs:
                if s.alive():
                    log(f"{s.name} (pid {s.pid}) still running after {timeout} s: SIGKILL")
                killpg(s.pid, signal.SIGKILL)
                s.proc.wait()


def describe_rc(rc):
    return f"signal {-rc}" if rc is not None and rc < 0 else f"code {rc}"


# --- faults -------------------------------------------------------------------------------------

class Faults:
    def __init__(self, cluster):
        self.cluster = cluster
        self.rng = random.Random(args.seed)
        self.done = []  # {"n", "kind", "t", "time", "target", "detail"}

    def record(self, kind, target, detail, t=None):
        n = len(self.done) + 1
        self.done.append({"n": n, "kind": kind, "t": round(since() if t is None else t, 2),
                          "time": datetime.datetime.now().isoformat(timespec="milliseconds"),
                          "target": target, "detail": detail})
        log(f"FAULT #{n} {kind}: {target}: {detail}")

    def run(self, stop):
        lo, hi = args.fault_interval
        while not stop.wait(self.rng.uniform(lo, hi)):
            if not self.cluster.wait_whole(30, stop) and not stop.is_set():
                self.cluster.anomaly("the cluster was not whole 30 s after the last fault "
                                     "(injecting the next one anyway)")
            if stop.is_set():
                return
            self.inject(self.rng.choice(FAULT_KINDS), stop)

    def inject(self, kind, stop):
        c = self.cluster
        rng = self.rng
        if kind == "kill-coordinator":
            with c.lock:
                if STOPPING.is_set():
                    return
                c.coordinator_down = True
                t = since()
                c.outages.append([t, None])
                pid = c.coordinator.pid
                killpg(pid, signal.SIGKILL)
                c.coordinator.proc.wait()
            delay = rng.uniform(1, 2)
            self.record(kind, f"coordinator pid {pid}",
                        f"SIGKILL; restarting it in {delay:.1f} s", t)
            time.sleep(delay)
            with c.lock:
                if STOPPING.is_set():
                    return
                c.coordinator.start()
                c.coordinator_restarts += 1
                c.coordinator_down = False
            log(f"coordinator restarted: pid {c.coordinator.pid}")
            c.mark_serving()
            return
        with c.lock:
            candidates = [w for w in c.workers if w.alive() and w.expect_exit is None]
            if not candidates or STOPPING.is_set():
                log(f"fault {kind} skipped: no worker to deal it to")
                return
            w = rng.choice(candidates)
            if kind == "kill-rank":
                ranks = w.ranks()
                if not ranks:
                    log(f"fault {kind} skipped: {w.name} has no rank processes yet")
                    return
                rank = rng.choice(ranks)
                w.expect_exit = kind
                os.kill(rank, signal.SIGKILL)
                self.record(kind, f"{w.name} rank pid {rank} (supervisor {w.pid}, ranks {ranks})",
                            "SIGKILL")
            elif kind == "kill-worker":
                w.expect_exit = kind
                os.kill(w.pid, signal.SIGKILL)
                self.record(kind, f"{w.name} supervisor pid {w.pid}", "SIGKILL")
            elif kind == "term-worker":
                w.expect_exit = kind
                os.kill(w.pid, signal.SIGTERM)
                self.record(kind, f"{w.name} supervisor pid {w.pid}",
                            "SIGTERM (drain, then the process manager restarts it)")
            elif kind == "stop-worker":
                w.stopped = True
                killpg(w.pid, signal.SIGSTOP)
                self.record(kind, f"{w.name} process group {w.pid}",
                            f"SIGSTOP for {args.stop_s:g} s")
        if kind == "stop-worker":
            stop.wait(args.stop_s)  # cut short at the end (Cluster.stop sends SIGCONT too)
            with c.lock:
                killpg(w.pid, signal.SIGCONT)
                w.stopped = False
            log(f"{w.name} process group {w.pid}: SIGCONT")


# --- references ---------------------------------------------------------------------------------

def grpc_generate(cluster, prompt, max_tokens, deadline_s):
    """One `gemmactl generate --json` stream: (ids, final or None, error or None, hung)."""
    argv = [GEMMACTL, "--coordinator", cluster.grpc,
            "--timeout-ms", str(int((deadline_s + 60) * 1000)),  # ours ends it first
            "generate", "--tokens", ",".join(map(str, prompt)), "--max-tokens", str(max_tokens),
            "--json"]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc is None:
        return [], None, "shutting down", False
    hung = False
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        hung = True
        killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    ids, final = [], None
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        ids += obj.get("token_ids", [])
        final = obj.get("final", final)
    error = None
    if hung:
        error = f"no end after {deadline_s:g} s"
    elif proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"gemmactl exited with {describe_rc(proc.returncode)}"
    return ids, final, error, hung


def http_client(cluster, deadline_s):
    return openai.OpenAI(base_url=f"http://{cluster.http}/v1", api_key="-", max_retries=0,
                         timeout=deadline_s)


def http_complete(client, prompt, max_tokens, stream):
    """One completion through the openai client: (text, completion_tokens, finish_reason)."""
    if not stream:
        r = client.completions.create(model="gemma-4", prompt=prompt, max_tokens=max_tokens,
                                      temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason
    text, tokens, finish = [], None, None
    for chunk in client.completions.create(model="gemma-4", prompt=prompt,
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            text.append(chunk.choices[0].text or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens, finish


def make_references(cluster):
    """Per (prompt, max_tokens): gemma-generate's ids, checked against one gRPC stream, and
    one streamed and one unstreamed HTTP completion, before any fault."""
    refs = {}
    client = http_client(cluster, 60)
    for prompt in PROMPTS:
        for n in MAX_TOKENS:
            out = subprocess.run([os.path.join(BIN, "gemma-generate"), "--model", args.model,
                                  "--tokens", ",".join(map(str, prompt)),
                                  "--max-new-tokens", str(n)],
                                 capture_output=True, text=True, check=True)
            ids = [int(t) for t in out.stdout.split()]
            got, final, error, _ = grpc_generate(cluster, prompt, n, 60)
            if error or got != ids:
                raise RuntimeError(f"before any fault, gRPC prompt {prompt} max_tokens {n} gave "
                                   f"{error or got}, gemma-generate {ids}")
            stream = http_complete(client, prompt, n, stream=True)
            whole = http_complete(client, prompt, n, stream=False)
            if stream[1] != len(ids) or whole[1] != len(ids):
                raise RuntimeError(f"before any fault, HTTP prompt {prompt} max_tokens {n} gave "
                                   f"{stream[1]} / {whole[1]} completion tokens, not {len(ids)}")
            refs[(tuple(prompt), n)] = {"ids": ids, "finish": final.get("finish_reason"),
                                        "stream": stream, "whole": whole}
    return refs


def diverged(out, ref):
    """How out (ids, or text) differs from ref: 'duplicated' when after their common prefix it
    goes on with ref from an earlier place (tokens repeated) or runs past ref's end, 'skipped'
    when it goes on from a later place, 'truncated' when it is a proper prefix, else 'other'."""
    k = 0
    while k < min(len(out), len(ref)) and out[k] == ref[k]:
        k += 1
    if k == len(out):
        return "truncated"
    if k == len(ref):
        return "duplicated"
    rest = out[k:]
    for j in range(len(ref)):
        m = min(len(rest), len(ref) - j)  # rest may run past ref's end only when repeated
        if j < k and rest[:m] == ref[j:j + m]:
            return "duplicated"
        if j > k and m == len(rest) and rest == ref[j:j + m]:
            return "skipped"
    return "other"


# --- traffic ------------------------------------------------------------------------------------

class Stats:
    def __init__(self, cluster, refs):
        self.cluster, self.refs = cluster, refs
        self.lock = threading.Lock()
        self.requests = []   # every request, in the order sent
        self.closed = False  # interrupted: requests ending now were cut short by the shutdown
        self.harness_errors = 0  # exceptions in this script's client code (the counts are off)
        self.out = open(os.path.join(LOG_DIR, "requests.jsonl"), "a", buffering=1)

    def begin(self, client, api, key):
        req = {"id": 0, "client": client, "api": api, "prompt": list(key[0]),
               "max_tokens": key[1], "start": since(), "end": None, "status": None}
        with self.lock:
            req["id"] = len(self.requests) + 1
            self.requests.append(req)
        return req

    def end(self, req, status, reason=None, error=None, output=None):
        with self.lock:
            if req["status"] is not None:  # already counted lost (or cut) at the end
                return
            if self.closed:  # started as the run was interrupted
                req.update(end=since(), status="interrupted")
                return
            req.update(end=since(), status=status, reason=reason, error=error)
            took = req["end"] - req["start"]
            if status == "completed" and took > SLOW_S:
                log(f"SLOW request #{req['id']} ({req['api']}, prompt {req['prompt']}, "
                    f"max_tokens {req['max_tokens']}): completed after {took:.1f} s")
            if status != "completed":
                entry = dict(req, output=output)
                self.out.write(json.dumps(entry) + "\n")
                if status in ("wrong", "lost"):
                    log(f"{status.upper()} request #{req['id']} ({req['api']}, prompt "
                        f"{req['prompt']}, max_tokens {req['max_tokens']}): {reason}; {error}")

    def judge(self, req, out, ref, error, hung, code=""):
        """Sorts one finished request (out: its output so far, ref: what it should be)."""
        if hung:
            return self.end(req, "lost", "hung", error, out)
        if error is not None:
            if ref[:len(out)] != out:
                return self.end(req, "wrong", "partial " + diverged(out, ref), error, out)
            if self.cluster.overlaps_outage(req["start"], since()):
                reason = "coordinator down"
            elif (code in ("RESOURCE_EXHAUSTED", "429")
                  or "no healthy replica" in error or "cluster is full" in error):
                reason = "refused"
            else:
                reason = "other"
            return self.end(req, "failed", reason, error, out)
        if out != ref:
            return self.end(req, "wrong", diverged(out, ref), None, out)
        return self.end(req, "completed")

    def grpc_request(self, req, key):
        ref = self.refs[key]
        ids, final, error, hung = grpc_generate(self.cluster, list(key[0]), key[1],
                                                args.deadline_s)
        code = error.split(":")[1].strip() if error and error.startswith("gemmactl:") else ""
        if error is None and final is None:
            error = "the stream ended without a final message, and gemmactl exited 0"
            if not self.cluster.overlaps_outage(req["start"], since()):
                return self.end(req, "wrong", "ended silently", error, ids)
        elif error is None and int(final.get("generated_tokens", -1)) != len(ids):
            return self.end(req, "wrong", "generated_tokens",
                            f"final says {final.get('generated_tokens')} tokens, "
                            f"{len(ids)} streamed", ids)
        self.judge(req, ids, ref["ids"], error, hung, code)

    def http_request(self, req, key, client):
        ref_text, ref_tokens, ref_finish = self.refs[key]["stream"]
        text, tokens, finish = [], None, None
        error, hung, code = None, False, ""
        t0 = time.monotonic()
        try:
            for chunk in client.completions.create(
                    model="gemma-4", prompt=list(key[0]), max_tokens=key[1], temperature=0,
                    stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    text.append(chunk.choices[0].text or "")
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:  # noqa: BLE001: every error ends the request as failed
            error = f"{type(e).__name__}: {e}"
            code = str(getattr(e, "status_code", ""))
            hung = "Timeout" in type(e).__name__ and time.monotonic() - t0 >= args.deadline_s
        text = "".join(text)
        if error is None and finish is None:
            error = "the stream ended without a finish_reason, and without an error"
            if not self.cluster.overlaps_outage(req["start"], since()):
                return self.end(req, "wrong", "ended silently", error, text)
        elif error is None and (tokens != ref_tokens or finish != ref_finish):
            what = "duplicated" if tokens is not None and tokens > ref_tokens else "usage"
            if text != ref_text:
                what = diverged(text, ref_text)
            return self.end(req, "wrong", what, f"completion_tokens {tokens} finish_reason "
                            f"{finish}; the reference {ref_tokens} {ref_finish}", text)
        self.judge(req, text, ref_text, error, hung, code)

    def client_loop(self, k, stop):
        rng = random.Random(args.seed * 1000 + k)
        client = http_client(self.cluster, args.deadline_s)
        keys = sorted(self.refs)
        while not stop.is_set():
            key = rng.choice(keys)
            api = rng.choice(["grpc", "http"])
            req = self.begin(k, api, key)
            try:
                if api == "grpc":
                    self.grpc_request(req, key)
                else:
                    self.http_request(req, key, client)
            except Exception:  # noqa: BLE001: a fault of this script; counted, and it fails
                log(f"HARNESS ERROR in client {k}, request #{req['id']}:\n"
                    + traceback.format_exc())
                self.harness_errors += 1
                self.end(req, "failed", "other", "soak.py: " + traceback.format_exc(limit=1))
            if req["status"] != "completed":
                stop.wait(rng.uniform(0.5, 1.5))

    def cut(self):
        """Requests still running when the run is interrupted are neither failed nor lost."""
        with self.lock:
            self.closed = True
            for r in self.requests:
                if r["status"] is None:
                    r.update(end=since(), status="interrupted")

    def mark_lost(self):
        """Requests still running now (after the deadline) are lost."""
        with self.lock:
            running = [r for r in self.requests if r["status"] is None]
        for r in running:
            self.end(r, "lost", "hung", f"still running at the end, {since() - r['start']:.0f} s "
                     "after it started")

    def counts(self):
        with self.lock:
            reqs = list(self.requests)
        table = {}
        for api in ("all", "grpc", "http"):
            sel = [r for r in reqs if api == "all" or r["api"] == api]
            c = collections.Counter(r["status"] for r in sel)
            reasons = collections.Counter(r["reason"] for r in sel if r["status"] == "failed")
            wrong = collections.Counter(r["reason"] for r in sel if r["status"] == "wrong")
            table[api] = {
                "sent": len(sel), "completed": c["completed"], "failed": c["failed"],
                "failed_by_reason": {k: reasons[k] for k in FAIL_REASONS},
                "wrong": c["wrong"],
                "duplicated": sum(v for k, v in wrong.items() if "duplicated" in k),
                "wrong_by_kind": dict(wrong),
                "lost": c["lost"], "in_flight": c[None], "interrupted": c["interrupted"]}
        lat = sorted(r["end"] - r["start"] for r in reqs if r["status"] == "completed")
        latency = {}
        if lat:
            latency = {"p50_s": round(statistics.median(lat), 3),
                       "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
                       "max_s": round(lat[-1], 3),
                       f"over_{SLOW_S}_s": sum(x > SLOW_S for x in lat)}
        return table, latency, reqs


# --- batches ------------------------------------------------------------------------------------

class Batches:
    def __init__(self, cluster, refs):
        self.cluster, self.refs = cluster, refs
        self.rng = random.Random(args.seed + 7)
        self.c = collections.Counter()
        self.problems = []

    def problem(self, msg):
        self.problems.append(msg)
        log(f"BATCH PROBLEM {msg}")

    def run(self, stop):
        n = 0
        next_at = 15
        while not stop.wait(max(0, next_at - since())):
            n += 1
            self.one(n)
            next_at = since() + args.batch_every

    def one(self, n):
        keys = sorted(self.refs)
        items = {f"soak-{n}-{i}": self.rng.choice(keys) for i in range(args.batch_items)}
        path = os.path.join(LOG_DIR, f"batch-{n}.jsonl")
        with open(path, "w") as f:
            for cid, key in items.items():
                f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                    "body": {"model": "gemma-4", "prompt": list(key[0]),
                                             "max_tokens": key[1], "temperature": 0}}) + "\n")
        # Submitting is retried while the coordinator is down (a submit cut short may have made
        # a batch nobody follows: that one is only in the coordinator's list).
        batch_id = None
        for _ in range(10):
            rc, out, err = gemmactl(self.cluster.grpc, "batch", "submit", path, "--json")
            m = re.search(r'"id":"(batch_[^"]+)"', out)
            if rc == 0 and m:
                batch_id = m.group(1)
                break
            time.sleep(2)
        if batch_id is None:
            self.c["submit_failed"] += 1
            log(f"batch {n}: submit failed: {err.strip()[-200:]}")
            return
        self.c["submitted"] += 1
        self.c["items_sent"] += len(items)
        log(f"batch {n}: {batch_id} submitted, {len(items)} items")
        deadline = time.monotonic() + args.deadline_s + 60
        status = None
        while time.monotonic() < deadline:
            rc, out, _ = gemmactl(self.cluster.grpc, "batch", "status", batch_id, "--json")
            m = re.search(r'"status":"([a-z_]+)"', out)
            status = m.group(1) if rc == 0 and m else status
            if status in ("completed", "failed", "expired", "cancelled"):
                break
            time.sleep(1)
        if status != "completed":
            self.c["unfinished"] += 1
            self.problem(f"batch {n} ({batch_id}) ended as {status or 'unknown'}, not completed")
            return
        results = os.path.join(LOG_DIR, f"batch-{n}.out.jsonl")
        errors = os.path.join(LOG_DIR, f"batch-{n}.errors.jsonl")
        for _ in range(10):
            rc, _, err = gemmactl(self.cluster.grpc, "batch", "results", batch_id,
                                  "--output", results, "--errors", errors)
            if rc == 0:
                break
            time.sleep(2)
        else:
            self.problem(f"batch {n} ({batch_id}): results failed: {err.strip()[-200:]}")
            return
        self.c["completed"] += 1
        seen = collections.Counter()
        for file, ok in ((results, True), (errors, False)):
            if not os.path.exists(file):
                continue
            for line in open(file):
                if not line.strip():
                    continue
                obj = json.loads(line)
                cid = obj.get("custom_id")
                seen[cid] += 1
                if cid not in items:
                    self.problem(f"batch {n}: unknown custom_id {cid}")
                    continue
                if seen[cid] > 1:
                    continue
                body = (obj.get("response") or {}).get("body") or {}
                status_code = (obj.get("response") or {}).get("status_code")
                if not ok or status_code != 200:
                    self.c["items_failed"] += 1
                    log(f"batch {n}: {cid} failed: {json.dumps(obj)[:300]}")
                    continue
                text = body["choices"][0]["text"]
                tokens = body["usage"]["completion_tokens"]
                ref_text, ref_tokens, _ = self.refs[items[cid]]["whole"]
                if text != ref_text or tokens != ref_tokens:
                    self.c["items_wrong"] += 1
                    self.problem(f"batch {n}: {cid} is wrong ({diverged(text, ref_text)}; "
                                 f"{tokens} tokens, the reference {ref_tokens})")
                else:
                    self.c["items_completed"] += 1
        for cid in items:
            if seen[cid] == 0:
                self.c["items_missing"] += 1
                self.problem(f"batch {n}: {cid} is missing from the results")
            elif seen[cid] > 1:
                self.c["items_duplicated"] += 1
                self.problem(f"batch {n}: {cid} came back {seen[cid]} times")
        log(f"batch {n}: {batch_id} done: {sum(seen.values())} result lines for {len(items)} "
            "items")


# --- main ---------------------------------------------------------------------------------------

def leftovers():
    """Processes started here (or below them) still alive."""
    with PGIDS_LOCK:
        groups = set(PGIDS)
    return group_members(groups)


def summary(cluster, faults, stats, batches, traffic_s, interrupted, whole_at_end, left):
    table, latency, reqs = stats.counts()
    fault_counts = {k: {"injected": 0, "failed": 0, "wrong": 0, "lost": 0} for k in FAULTS}
    for f in faults.done:
        fault_counts[f["kind"]]["injected"] += 1
    for r in reqs:
        if r["status"] in ("failed", "wrong", "lost") and r["end"] is not None:
            before = [f for f in faults.done if f["t"] <= r["end"] <= f["t"] + ATTRIBUTION_S]
            if before:
                fault_counts[before[-1]["kind"]][r["status"]] += 1
    # What the coordinator says it did: requests moved to another replica, with the tokens
    # already streamed (its log across restarts).
    moved = re.findall(r"re-queued on replica \S+ at \S+, resuming after (\d+) token",
                       open(cluster.coordinator.log_path, errors="replace").read())
    failovers = {"re_queued": len(moved), "mid_stream": sum(int(n) > 0 for n in moved)}
    b = batches.c if batches else collections.Counter()
    result = {
        "minutes": args.minutes, "traffic_s": round(traffic_s, 1),
        "elapsed_s": round(since(), 1), "clients": args.clients,
        "seed": args.seed, "interrupted": interrupted, "log_dir": LOG_DIR,
        "requests": table, "latency": latency,
        "faults": fault_counts, "fault_log": faults.done,
        "batches": {k: b[k] for k in ("submitted", "submit_failed", "completed", "unfinished",
                                      "items_sent", "items_completed", "items_failed",
                                      "items_wrong", "items_missing", "items_duplicated")},
        "batch_problems": batches.problems if batches else [],
        "worker_restarts": cluster.worker_restarts,
        "coordinator_restarts": cluster.coordinator_restarts, "failovers": failovers,
        "outages_s": [round((up or since()) - down, 1) for down, up in cluster.outages],
        "anomalies": cluster.anomalies, "cluster_whole_at_end": whole_at_end,
        "processes_left": left, "harness_errors": stats.harness_errors,
    }
    t = table
    print()
    print(f"== soak summary: {traffic_s / 60:.1f} min of traffic ({since() / 60:.1f} min in all), "
          f"{args.clients} clients, seed {args.seed}, {len(faults.done)} faults"
          f"{' (interrupted)' if interrupted else ''}")
    print(f"{'requests':<22}{'all':>8}{'grpc':>8}{'http':>8}")
    rows = [("sent", lambda x: x["sent"]), ("completed", lambda x: x["completed"]),
            ("failed", lambda x: x["failed"])]
    rows += [(f"  {k}", lambda x, k=k: x["failed_by_reason"][k]) for k in FAIL_REASONS]
    rows += [("wrong", lambda x: x["wrong"]), ("  duplicated", lambda x: x["duplicated"]),
             ("lost", lambda x: x["lost"])]
    if interrupted:
        rows.append(("cut by the interrupt", lambda x: x["interrupted"]))
    for name, get in rows:
        print(f"{name:<22}" + "".join(f"{get(t[a]):>8}" for a in ("all", "grpc", "http")))
    if t["all"]["wrong_by_kind"]:
        print(f"  wrong by kind: {t['all']['wrong_by_kind']}")
    if latency:
        print(f"latency of completed: p50 {latency['p50_s']} s, p99 {latency['p99_s']} s, "
              f"max {latency['max_s']} s; {latency[f'over_{SLOW_S}_s']} over {SLOW_S} s")
    print()
    print(f"{'fault':<18}{'count':>7}   requests ending within {ATTRIBUTION_S} s after it: "
          "failed / wrong / lost")
    for k in FAULTS:
        fc = fault_counts[k]
        print(f"{k:<18}{fc['injected']:>7}   {fc['failed']:>6} / {fc['wrong']} / {fc['lost']}")
    print()
    rb = result["batches"]
    print(f"batches: {rb['submitted']} submitted ({rb['submit_failed']} failed to submit), "
          f"{rb['completed']} completed, {rb['unfinished']} unfinished; items: "
          f"{rb['items_sent']} sent, {rb['items_completed']} completed, {rb['items_failed']} "
          f"failed, {rb['items_wrong']} wrong, {rb['items_missing']} missing, "
          f"{rb['items_duplicated']} duplicated")
    print(f"failovers: {failovers['re_queued']} requests re-queued on another replica, "
          f"{failovers['mid_stream']} of them mid-stream (coordinator log)")
    print(f"processes: {cluster.worker_restarts} worker restarts, {cluster.coordinator_restarts} "
          f"coordinator restarts (outages {result['outages_s']} s); "
          f"{len(cluster.anomalies)} anomalies")
    for a in cluster.anomalies:
        print(f"  +{a['t']}s {a['what']}")
    reasons = []
    if t["all"]["lost"]:
        reasons.append(f"{t['all']['lost']} lost")
    if t["all"]["wrong"]:
        reasons.append(f"{t['all']['wrong']} wrong")
    if rb["items_wrong"] or rb["items_missing"] or rb["items_duplicated"] or rb["unfinished"]:
        reasons.append("batch items wrong, missing, duplicated or unfinished")
    if not whole_at_end and not interrupted:
        reasons.append("the cluster was not whole at the end")
    if left:
        reasons.append(f"processes left behind: {left}")
    if stats.harness_errors:
        reasons.append(f"{stats.harness_errors} errors in soak.py itself (see soak.log)")
    result["verdict"] = ("FAIL: " + "; ".join(reasons) if reasons
                         else "PASS so far (interrupted)" if interrupted else "PASS")
    print(f"verdict: {result['verdict']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"JSON written to {args.json_out}")
    return not reasons


def main():
    print(f"soak: logs in {LOG_DIR}", flush=True)
    log(f"seed {args.seed}; {args.minutes:g} min, {args.clients} clients, faults "
        f"{','.join(FAULT_KINDS) or 'none'} every {args.fault_interval[0]:g}-"
        f"{args.fault_interval[1]:g} s, workers with {args.workers} ranks")
    cluster = Cluster()
    faults = Faults(cluster)
    stats = batches = None
    traffic_stop = threading.Event()
    interrupted = False
    ok = False
    whole_at_end = False
    traffic_start = traffic_end = None

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT
    signal.signal(signal.SIGTERM, on_term)                    # ignored (a background job)
    signal.signal(signal.SIGHUP, on_term)
    try:
        cluster.start()
        threading.Thread(target=cluster.manage, daemon=True).start()
        log("computing references")
        refs = make_references(cluster)
        log(f"references: {len(refs)} (prompt, max_tokens) pairs; gRPC equal to gemma-generate")
        stats = Stats(cluster, refs)
        batches = Batches(cluster, refs) if args.batch_every > 0 else None
        clients = [threading.Thread(target=stats.client_loop, args=(k, traffic_stop),
                                    daemon=True) for k in range(args.clients)]
        for t in clients:
            t.start()
        fault_thread = threading.Thread(target=faults.run, args=(traffic_stop,), daemon=True)
        if FAULT_KINDS:
            fault_thread.start()
        batch_thread = None
        if batches:
            batch_thread = threading.Thread(target=batches.run, args=(traffic_stop,),
                                            daemon=True)
            batch_thread.start()
        traffic_start = since()
        end_at = time.monotonic() + args.minutes * 60
        while time.monotonic() < end_at:
            time.sleep(min(10, max(0, end_at - time.monotonic())))
            c = stats.counts()[0]["all"]
            log(f"progress: sent {c['sent']}, completed {c['completed']}, failed {c['failed']}, "
                f"wrong {c['wrong']}, lost {c['lost']}, in flight {c['in_flight']}; "
                f"faults {len(faults.done)}")
        log("traffic stops; waiting for the requests in flight")
        traffic_stop.set()
        traffic_end = since()
        if FAULT_KINDS:
            fault_thread.join(60)
        deadline = time.monotonic() + args.deadline_s + 5
        for t in clients:
            t.join(max(0, deadline - time.monotonic()))
        stats.mark_lost()
        if batch_thread:
            batch_thread.join(args.deadline_s + 120)
            if batch_thread.is_alive():
                batches.problem("the last batch had not finished by the end")
        whole_at_end = cluster.wait_whole(60)
        log("cluster whole at the end" if whole_at_end else "the cluster is NOT whole at the end")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except RuntimeError as e:
        log(f"soak.py: {e}")
        stats = None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the shutdown is bounded; let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        traffic_stop.set()
        if stats is not None and interrupted:
            stats.cut()
        with PGIDS_LOCK:
            STOPPING.set()
        log("stopping the cluster")
        servers = {s.proc for s in cluster.workers + [cluster.coordinator]}
        for p in list(CHILDREN):
            if p not in servers and p.poll() is None:
                killpg(p.pid, signal.SIGKILL)  # gemmactl clients still running
        with cluster.lock:
            cluster.stop()
        kill_children()
        time.sleep(0.5)
        left = leftovers()
        if left:
            log(f"processes left behind: {left}; SIGKILL")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            log("all processes stopped, none left")
        if stats is not None:
            traffic_s = (traffic_end or since()) - (traffic_start or since())
            ok = summary(cluster, faults, stats, batches, traffic_s, interrupted, whole_at_end,
                         left)
        LOG_FILE.close()
        failed = not ok and not (interrupted and stats is None)
        if not failed and not args.keep_logs:
            shutil.rmtree(LOG_DIR, ignore_errors=True)
        else:
            if not failed:
                shutil.rmtree(BIN, ignore_errors=True)  # kept only to reproduce a failure
            print(f"logs kept in {LOG_DIR}")
    return 1 if failed else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
