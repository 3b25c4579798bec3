#!/usr/bin/env python3
"""Bounded load test of the coordinator's front doors on loopback: thousands of concurrent
streams, the coordinator's and the workers' memory and descriptors, the admission limits'
answers, and what stalled HTTP clients do to everyone else.

  load_test.py [--streams N] [--grpc-streams G] [--max-tokens T] [--rounds R] [--ramp-s S]
               [--pooled-streams P] [--max-outstanding-per-replica L] [--max-queued Q]
               [--queue-wait-ms W] [--stalled S] [--stall-kinds KIND,...] [--stall-window SEC]
               [--stream-timeout SEC] [--timeout SEC] [--json-out FILE] [--keep-logs]

Two clusters are started here, one after the other, each a gemma-coordinator (free 127.0.0.1
ports, --insecure, --served-model-name tiny-moe) and two gemma-workers of
tests/golden/data/tiny-moe (--threads 1), from BUILD/bin (--build, default build/), every
process the leader of its own process group; all of them are stopped on exit, on Ctrl-C,
SIGTERM and --timeout (default 300 s) included. The soft RLIMIT_NOFILE is raised for the
thousands of sockets (the servers inherit it). Every request is the prompt [2, 17, 301]
(token ids), greedy, max_tokens T (default 16).

References: one streamed HTTP completion and one `gemmactl generate --json` (gRPC) on the idle
cluster; every accepted stream below must give exactly their text (and, for gRPC, token ids).

Open cluster (the coordinator's default admission limits):
  load      R rounds (default 2) of N HTTP streams (default 2000; the official openai client's
            AsyncOpenAI, streamed completions, a connection per stream, all opened at once, or
            spread over --ramp-s) with G gRPC streams (default 32; a `gemmactl generate` process
            each) beside them. After each round the coordinator's descriptors must come back
            near the baseline (+8) within --settle-s (15), and its and the workers' RSS must not
            grow more than 8 MiB from the end of round 1 to the end of the last round.
  pooled    P streams (default 256; 0: none) through AsyncOpenAI as it comes (its default
            connection pool keeps up to 100 idle keep-alive connections): its throughput
            against the load rounds'.
  stalls    for each kind, S sockets (default 100, connecting 10 ms apart: --stall-connect-ms)
            stall while C normal clients (default 8; the openai client, a new connection per
            request) stream one request after another for --stall-window seconds (8), with one
            gRPC client (gemmactl, one request after another) as a control; the phase "none"
            (no stalled sockets) comes first, as the baseline. Kinds (--stall-kinds):
              no-read       a complete streamed request (SO_RCVBUF 4 KiB), then never reads
              half-body     the headers and half of the body, then nothing more
              idle          connects and sends nothing (as an idle keep-alive connection)
              slow-headers  one byte a second (not run unless named: it holds a thread for as
                            long as it trickles)
            For half-body and idle sockets, the time until the server answers or closes them
            (up to 20 s after the window) is how long each held one of the HTTP port's threads,
            queueing included; for no-read ones, whether the server had closed them by the end.
Limited cluster (--max-outstanding-per-replica L (8), --max-queued Q (16), --queue-wait-ms W
(100)):
  admission N HTTP and G gRPC streams at once. A refused one must get HTTP 429 or 503 (gRPC
            RESOURCE_EXHAUSTED or UNAVAILABLE) with an OpenAI-shaped body
            ({"error": {"message", "type", ...}}) whose message names the limit; every accepted
            one must complete with the reference text.

The HTTP port is cpp-httplib with a pool of --http-threads threads (512); a stream holds its
thread from the request to the end of the response, and an idle keep-alive connection holds
one up to 5 s. At most that many HTTP requests reach the admission queue at once, so admission
limits with 2L + Q >= the threads (two replicas) never refuse an HTTP request: the rest wait in
httplib's unbounded queue of accepted connections.

A thread samples /proc/PID/status (VmRSS, VmHWM, Threads) and counts /proc/PID/fd of the
coordinator and of each worker (its supervisor and rank processes together) every 100 ms:
baseline (idle, after the references), peak per phase, and after each phase once settled. The
kernel's TCP counters of listen-queue overflows and resets (/proc/net/netstat, /proc/net/snmp;
the whole network namespace) are recorded per burst and per stall phase.

Every stream ends as exactly one of: ok (the reference text), mismatch (completed, other text),
refused (a clear refusal, as above), refused_unclear (429/503 without a clear body or message),
hung (no end within --stream-timeout, default 60 s), reset (connection reset or closed
mid-request), error (anything else). Prints a summary; --json-out FILE gets every figure.
Exits 1 when any stream hung, was reset, failed otherwise or differed from the reference, when
a refusal was unclear, when the descriptors did not come back or the RSS grew, or when
--timeout ran out; 2 when a cluster could not be started; 130 when interrupted.
"""
import argparse
import asyncio
import collections
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx2
import openai

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [2, 17, 301]
MODEL_NAME = "tiny-moe"
HOLD_CAP_S = 20               # how long a stall phase waits for the server to drop its sockets
RSS_SLACK_MIB = 8             # RSS growth allowed over the load rounds after the first
FD_SLACK = 8                  # descriptors above the baseline still counted as "back"
LIMIT_RE = re.compile(r"limit|queue|full|capacity|overload|too many", re.I)
STALL_KINDS = ("no-read", "half-body", "idle", "slow-headers")

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--build", default=os.path.join(REPO, "build"),
                    help="build directory holding bin/ (default: build)")
parser.add_argument("--model", default=os.path.join(REPO, "tests/golden/data/tiny-moe"))
parser.add_argument("--streams", type=int, default=2000,
                    help="concurrent HTTP streams per load round and in the admission run")
parser.add_argument("--grpc-streams", type=int, default=32,
                    help="concurrent gRPC streams (gemmactl processes) beside them")
parser.add_argument("--max-tokens", type=int, default=16)
parser.add_argument("--rounds", type=int, default=2, help="load rounds on the open cluster")
parser.add_argument("--ramp-s", type=float, default=0,
                    help="open the streams of a burst evenly over this many seconds (default 0: "
                         "all at once)")
parser.add_argument("--pooled-streams", type=int, default=256,
                    help="streams through the openai client's default pool (0: skip)")
parser.add_argument("--max-outstanding-per-replica", type=int, default=8,
                    help="admission limit of the limited cluster")
parser.add_argument("--max-queued", type=int, default=16)
parser.add_argument("--http-threads", type=int, default=512,
                    help="the coordinator's --http-threads (its default, 512)")
parser.add_argument("--queue-wait-ms", type=int, default=100)
parser.add_argument("--stalled", type=int, default=100, help="stalled sockets per stall kind")
parser.add_argument("--stall-kinds", default="no-read,half-body,idle",
                    help=f"comma-separated, of {', '.join(STALL_KINDS)}; empty: no stall phases")
parser.add_argument("--stall-window", type=float, default=8,
                    help="seconds the normal clients send requests in each stall phase")
parser.add_argument("--stall-connect-ms", type=float, default=10,
                    help="milliseconds between two stalled sockets' connects (a burst of "
                         "connects overflows the HTTP port's listen backlog of 5: the kernel "
                         "drops the handshakes it cannot queue, and a socket that then sends "
                         "nothing never reaches the server)")
parser.add_argument("--stall-max-tokens", type=int, default=0,
                    help="max_tokens of the no-read sockets' requests (0: --max-tokens)")
parser.add_argument("--normal-clients", type=int, default=8)
parser.add_argument("--stream-timeout", type=float, default=60,
                    help="seconds a stream may take in all before it counts as hung")
parser.add_argument("--settle-s", type=float, default=15,
                    help="seconds the coordinator gets to come back to its baseline")
parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
parser.add_argument("--json-out", default="")
parser.add_argument("--keep-logs", action="store_true",
                    help="keep the processes' logs (they are kept anyway when the run fails)")
args = parser.parse_args()

BIN = os.path.join(args.build, "bin")
GEMMACTL = os.path.join(BIN, "gemmactl")
T0 = time.monotonic()
KINDS = [k for k in args.stall_kinds.split(",") if k]
for k in KINDS:
    if k not in STALL_KINDS:
        parser.error(f"unknown stall kind {k!r} (kinds: {', '.join(STALL_KINDS)})")


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    v = sorted(values)
    if not v:
        return None
    return round(v[min(len(v) - 1, int(p * len(v)))], 4)


def dist(values):
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
            "max": round(max(values), 4) if values else None}


# --- processes ----------------------------------------------------------------------------------

PGIDS = set()        # process groups started here (servers and gemmactl clients): pgid = pid
PGIDS_LOCK = threading.Lock()


def killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(argv, log_path):
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with PGIDS_LOCK:
        PGIDS.add(proc.pid)
    return proc


def stop_groups(procs, term_s=5.0):
    """SIGTERM each leader (a worker then stops and reaps its rank processes), SIGKILL each
    group after term_s (whatever is left of it), reap the leaders."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + term_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        with PGIDS_LOCK:
            PGIDS.discard(proc.pid)


def kill_everything():
    with PGIDS_LOCK:
        groups = list(PGIDS)
        PGIDS.clear()
    for g in groups:
        killpg(g, signal.SIGKILL)


def proc_children():
    """pid -> ppid of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            out[int(d)] = int(rest[1])
        except (OSError, IndexError, ValueError):
            pass
    return out


def tree(root, parents):
    pids = [root]
    for pid, ppid in parents.items():
        if ppid in pids and pid not in pids:
            pids.append(pid)
    return pids


def proc_figures(pid):
    """VmRSS, VmHWM (KiB), threads and open descriptors of one process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(re.findall(r"^(VmRSS|VmHWM|Threads):\s+(\d+)", status, re.M))
    if "VmRSS" not in fields:  # a zombie
        return None
    return {"rss_kib": int(fields["VmRSS"]), "hwm_kib": int(fields.get("VmHWM", 0)),
            "threads": int(fields.get("Threads", 0)), "fds": fds}


class Sampler(threading.Thread):
    """Samples the cluster's processes every interval seconds; peaks per phase."""

    def __init__(self, interval=0.1):
        super().__init__(daemon=True)
        self.interval = interval
        self.lock = threading.Lock()
        self.roles = {}            # role -> root pid
        self.trees = {}            # role -> pids (root and descendants)
        self.phase = "idle"
        self.peaks = {}            # phase -> role -> figures
        self.samples = 0
        self.stop = threading.Event()

    def watch(self, roles):
        with self.lock:
            self.roles = dict(roles)
            self.trees = {}
        self.refresh()

    def refresh(self):
        parents = proc_children()
        with self.lock:
            self.trees = {r: tree(p, parents) for r, p in self.roles.items()}

    def set_phase(self, phase):
        with self.lock:
            self.phase = phase

    def snapshot(self):
        with self.lock:
            trees = dict(self.trees)
        snap = {}
        for role, pids in trees.items():
            total = None
            for pid in pids:
                f = proc_figures(pid)
                if f is None:
                    continue
                if total is None:
                    total = dict(f)
                else:
                    for k in total:
                        total[k] += f[k]
            if total is not None:
                total["processes"] = len(pids)
                snap[role] = total
        return snap

    def run(self):
        last_refresh = 0.0
        while not self.stop.wait(self.interval):
            if time.monotonic() - last_refresh > 1.0:
                self.refresh()
                last_refresh = time.monotonic()
            snap = self.snapshot()
            with self.lock:
                phase = self.phase
                self.samples += 1
                peaks = self.peaks.setdefault(phase, {})
                for role, f in snap.items():
                    p = peaks.setdefault(role, {"rss_kib": 0, "hwm_kib": 0, "fds": 0,
                                                "threads": 0})
                    for k in p:
                        p[k] = max(p[k], f[k])

    def phase_peaks(self, phase):
        with self.lock:
            return json.loads(json.dumps(self.peaks.get(phase, {})))


SAMPLER = Sampler()


KERNEL_COUNTERS = {"TcpExt": ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies",
                              "SyncookiesFailed", "TCPAbortOnData"),
                   "Tcp": ("EstabResets", "OutRsts")}


def tcp_counters():
    """The kernel's TCP counters of listen-queue overflows and resets (they count the whole
    network namespace, other processes' connections included)."""
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for i in range(0, len(lines) - 1, 2):
            group = lines[i].split(":")[0]
            if group in KERNEL_COUNTERS and lines[i + 1].startswith(group + ":"):
                names, values = lines[i].split()[1:], lines[i + 1].split()[1:]
                d = dict(zip(names, values))
                for k in KERNEL_COUNTERS[group]:
                    if k in d:
                        out[k] = int(d[k])
    return out


def counter_delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in before}


def listen_backlog(port):
    """The listen backlog of 127.0.0.1:port as `ss -ltn` shows it (Send-Q), or None."""
    if shutil.which("ss") is None:
        return None
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "LISTEN":
            return int(parts[2])
    return None


class Cluster:
    """A coordinator and two workers of the model on free loopback ports."""

    def __init__(self, name, logdir, coordinator_flags=()):
        self.name = name
        self.logdir = logdir
        self.flags = list(coordinator_flags)
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.http = f"127.0.0.1:{self.http_port}"
        self.coordinator = None
        self.workers = []

    def log_path(self, who):
        return os.path.join(self.logdir, f"{self.name}-{who}.log")

    def start(self, timeout=90):
        argv = [os.path.join(BIN, "gemma-coordinator"), "--listen", self.grpc,
                "--http-listen", self.http, "--insecure", "--served-model-name", MODEL_NAME,
                "--http-threads", str(args.http_threads), *self.flags]
        self.coordinator = spawn(argv, self.log_path("coordinator"))
        deadline = time.monotonic() + timeout
        while "http serving on" not in self.log_text("coordinator"):
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the coordinator did not start "
                                   f"(log {self.log_path('coordinator')})")
            time.sleep(0.05)
        for i in (1, 2):
            self.workers.append(spawn(
                [os.path.join(BIN, "gemma-worker"), "--coordinator", self.grpc, "--model",
                 args.model, "--listen", "127.0.0.1:0", "--threads", "1"],
                self.log_path(f"worker{i}")))
        while True:
            healthy = self.healthy()
            if healthy >= 2:
                break
            dead = [p for p in [self.coordinator, *self.workers] if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {healthy} of 2 replicas healthy "
                                   f"(logs in {self.logdir})")
            time.sleep(0.2)
        SAMPLER.watch({"coordinator": self.coordinator.pid,
                       "worker1": self.workers[0].pid, "worker2": self.workers[1].pid})

    def healthy(self):
        try:
            out = subprocess.run([GEMMACTL, "--coordinator", self.grpc, "status", "--json"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(1 for r in json.loads(out).get("replicas", []) if r.get("healthy"))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return 0

    def log_text(self, who):
        try:
            with open(self.log_path(who), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self):
        return all(p.poll() is None for p in [self.coordinator, *self.workers] if p)

    def exits(self):
        """How the processes that are gone ended."""
        out = []
        for name, p in [("coordinator", self.coordinator),
                        *[(f"worker{i}", w) for i, w in enumerate(self.workers, 1)]]:
            rc = p.poll() if p else None
            if rc is not None:
                how = f"signal {-rc}" if rc < 0 else f"status {rc}"
                out.append(f"{name} (pid {p.pid}) exited with {how}, log "
                           f"{self.log_path(name)}")
        return "; ".join(out)

    def stop(self):
        stop_groups(self.workers)  # idle workers leave at once on SIGTERM
        if self.coordinator is not None:
            stop_groups([self.coordinator])


# --- one stream ---------------------------------------------------------------------------------

def chain(e):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def is_reset(e):
    for x in chain(e):
        if isinstance(x, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return True
        name, text = type(x).__name__, str(x).lower()
        if name in ("RemoteProtocolError", "ReadError", "WriteError") or "reset" in text \
                or "disconnected" in text or "peer closed" in text:
            return True
    return False


def judge_refusal(status, body_text, headers):
    """(outcome, message, retry_after) of an HTTP error answer."""
    try:
        body = json.loads(body_text)
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    shaped = isinstance(msg, str) and msg != "" and isinstance(err.get("type"), str)
    if status in (429, 503) and shaped and LIMIT_RE.search(msg):
        if not headers.get("retry-after"):
            return "refused_unclear", f"no Retry-After header: {msg}", None
        return "refused", msg, headers.get("retry-after")
    if status in (429, 503):
        return "refused_unclear", msg or body_text[:300], headers.get("retry-after")
    return "error", f"HTTP {status}: {msg or body_text[:300]}", None


def http_client(pool="close", streams=64):
    """The official async client: one connection per stream ("close") or its default pool."""
    kw = {}
    if pool == "close":
        kw["http_client"] = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=streams + 16, max_keepalive_connections=0),
            timeout=httpx2.Timeout(args.stream_timeout))
    return openai.AsyncOpenAI(base_url=f"http://{CURRENT['http']}/v1", api_key="-",
                              max_retries=0, timeout=args.stream_timeout, **kw)


CURRENT = {}          # the cluster the streams go to: http, grpc
REFS = {}             # http_text, finish_reason, grpc_text, grpc_ids
LIVE = collections.Counter()   # streams open now, for the peak


async def http_stream(client, max_tokens=None, delay_s=0.0):
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    rec = {"api": "http"}
    t0 = time.monotonic()
    LIVE["http"] += 1
    LIVE["peak_http"] = max(LIVE["peak_http"], LIVE["http"])
    try:
        async with asyncio.timeout(args.stream_timeout):
            stream = await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens or args.max_tokens,
                temperature=0, stream=True)
            rec["headers_s"] = time.monotonic() - t0   # the response's status and headers
            text, finish = [], None
            async for chunk in stream:
                if "ttft_s" not in rec:
                    rec["ttft_s"] = time.monotonic() - t0
                for c in chunk.choices:
                    text.append(c.text or "")
                    finish = c.finish_reason or finish
        rec["text"] = "".join(text)
        same = rec["text"] == REFS.get("http_text") and finish == REFS.get("finish_reason")
        rec["outcome"] = "ok" if same or "http_text" not in REFS else "mismatch"
        rec["finish_reason"] = finish
    except openai.APIStatusError as e:
        outcome, msg, retry_after = judge_refusal(e.status_code, e.response.text,
                                                  e.response.headers)
        rec.update(outcome=outcome, status=e.status_code, message=msg, retry_after=retry_after)
    except (TimeoutError, openai.APITimeoutError):
        rec.update(outcome="hung", message=f"no end within {args.stream_timeout:g} s")
    except openai.APIConnectionError as e:
        rec.update(outcome="reset" if is_reset(e) else "error",
                   message=" <- ".join(f"{type(x).__name__}: {x}" for x in chain(e))[:300])
    except Exception as e:  # an error event inside the stream, or anything else
        rec.update(outcome="error", message=f"{type(e).__name__}: {e}"[:300])
    finally:
        LIVE["http"] -= 1
    rec["total_s"] = time.monotonic() - t0
    if rec["outcome"] in ("hung", "reset", "error"):
        where = ("mid-stream" if "ttft_s" in rec else "after the headers, before any event")\
            if "headers_s" in rec else "before the response headers"
        rec["message"] = f"{where}, {rec['total_s']:.1f} s after the request: {rec['message']}"
    return rec


async def grpc_stream(delay_s=0.0):
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    rec = {"api": "grpc"}
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            GEMMACTL, "--coordinator", CURRENT["grpc"], "--timeout-ms",
            str(int(args.stream_timeout * 1000) + 5000), "generate", "--tokens",
            ",".join(map(str, PROMPT)), "--max-tokens", str(args.max_tokens), "--json",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
    except OSError as e:
        rec.update(outcome="error", message=f"cannot start gemmactl: {e}",
                   total_s=time.monotonic() - t0)
        return rec
    with PGIDS_LOCK:
        PGIDS.add(proc.pid)
    ids, text = [], []
    try:
        async with asyncio.timeout(args.stream_timeout):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                if "ttft_s" not in rec:
                    rec["ttft_s"] = time.monotonic() - t0
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                ids += obj.get("token_ids", [])
                text.append(obj.get("text", ""))
            err = (await proc.stderr.read()).decode(errors="replace")
            rc = await proc.wait()
    except TimeoutError:
        killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        rec.update(outcome="hung", message=f"no end within {args.stream_timeout:g} s")
        rc = None
    finally:
        with PGIDS_LOCK:
            PGIDS.discard(proc.pid)
    rec["total_s"] = time.monotonic() - t0
    if rc is None:
        return rec
    rec["text"], rec["ids"] = "".join(text), ids
    if rc == 0:
        same = (rec["text"], ids) == (REFS.get("grpc_text"), REFS.get("grpc_ids"))
        rec["outcome"] = "ok" if same or "grpc_ids" not in REFS else "mismatch"
        return rec
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"gemmactl exited with {rc}"
    m = re.match(r"gemmactl: ([A-Z_]+): (.*)", last)
    code, msg = (m.group(1), m.group(2)) if m else ("", last)
    if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        outcome = "refused" if LIMIT_RE.search(msg) else "refused_unclear"
    elif code == "DEADLINE_EXCEEDED":
        outcome = "hung"
    elif is_reset_text(msg):
        outcome = "reset"
    else:
        outcome = "error"
    rec.update(outcome=outcome, status=code or rc, message=msg[:300])
    return rec


def is_reset_text(msg):
    return bool(re.search(r"reset|socket closed|connection closed", msg, re.I))


OUTCOMES = ("ok", "mismatch", "refused", "refused_unclear", "hung", "reset", "error")


def tally(recs, wall_s=None):
    """Counts, message samples and latencies of a list of stream records."""
    out = {"opened": len(recs)}
    counts = collections.Counter(r["outcome"] for r in recs)
    out.update({k: counts.get(k, 0) for k in OUTCOMES})
    # Accepted: the server took it on (HTTP 200 and its headers; gRPC output or success).
    out["accepted"] = sum(1 for r in recs if "headers_s" in r or r.get("ids")
                          or (r["api"] == "grpc" and r["outcome"] in ("ok", "mismatch")))
    out["failed_otherwise"] = sum(counts.get(k, 0) for k in
                                  ("mismatch", "refused_unclear", "hung", "reset", "error"))
    ok = [r for r in recs if r["outcome"] == "ok"]
    out["ttft_s"] = dist([r["ttft_s"] for r in ok if "ttft_s" in r])
    out["total_s"] = dist([r["total_s"] for r in ok])
    refused = [r for r in recs if r["outcome"] in ("refused", "refused_unclear")]
    if refused:
        out["refused_answer_s"] = dist([r["total_s"] for r in refused])
        out["refused_status"] = dict(collections.Counter(str(r.get("status")) for r in refused))
        out["retry_after_header"] = sum(1 for r in refused if r.get("retry_after"))
    samples = collections.OrderedDict()
    for r in recs:
        if r["outcome"] == "ok" or not r.get("message"):
            continue
        key = (r["outcome"], re.sub(r"\d+", "N", r["message"]))
        if key not in samples:
            samples[key] = {"outcome": r["outcome"], "status": r.get("status"),
                            "message": r["message"], "count": 0}
        samples[key]["count"] += 1
    out["messages"] = sorted(samples.values(), key=lambda s: -s["count"])[:8]
    mism = [r for r in recs if r["outcome"] == "mismatch"][:3]
    if mism:
        out["mismatch_samples"] = [{"text": r.get("text"), "ids": r.get("ids")} for r in mism]
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 3)
        out["completed_per_s"] = round(len(ok) / wall_s, 1) if wall_s > 0 else None
    return out


async def burst(n_http, n_grpc, pool="close"):
    """n_http HTTP and n_grpc gRPC streams started at once; their tallies."""
    client = http_client(pool, n_http)
    LIVE["peak_http"] = 0
    t0 = time.monotonic()
    tasks = []
    every = max(1, n_http // max(1, n_grpc))
    g = 0
    step = args.ramp_s / max(1, n_http)
    for i in range(n_http):
        tasks.append(asyncio.create_task(http_stream(client, delay_s=i * step)))
        if g < n_grpc and i % every == 0:
            tasks.append(asyncio.create_task(grpc_stream(delay_s=i * step)))
            g += 1
    while g < n_grpc:
        tasks.append(asyncio.create_task(grpc_stream()))
        g += 1
    recs = await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    await client.close()
    http = tally([r for r in recs if r["api"] == "http"], wall)
    http["peak_open"] = LIVE["peak_http"]
    return {"http": http, "grpc": tally([r for r in recs if r["api"] == "grpc"])}


# --- stalled sockets ----------------------------------------------------------------------------

def request_bytes(max_tokens, stream=True):
    body = json.dumps({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {CURRENT['http']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


async def staller(kind, stop, rec, delay_s):
    """One stalled socket (connecting after delay_s) until `stop`; rec gets whether it
    connected and, for the kinds that read, how long until the server answered or closed it."""
    await asyncio.sleep(delay_s)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    if kind == "no-read":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", CURRENT["http_port"])), 30)
        rec["connected"] = True
        head, body = request_bytes(args.stall_max_tokens or args.max_tokens)
        if kind == "no-read":
            await loop.sock_sendall(sock, head + body)
            await stop.wait()
            # Only now: whether the server has given up on it (closed it) meanwhile.
            rec["closed_by_server"] = await closed_by_peer(loop, sock)
            return
        if kind == "half-body":
            await loop.sock_sendall(sock, head + body[:len(body) // 2])
        if kind == "slow-headers":
            data = head + body
            for b in data:
                if stop.is_set():
                    return
                await loop.sock_sendall(sock, bytes([b]))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
            return
        recv = asyncio.ensure_future(loop.sock_recv(sock, 65536))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([recv, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if recv.done():
            try:
                data = recv.result()
            except OSError as e:
                data = f"{type(e).__name__}".encode()
            rec["held_s"] = time.monotonic() - t0
            rec["answer"] = data.split(b"\r\n", 1)[0].decode(errors="replace") if data \
                else "closed"
        else:
            recv.cancel()
    except (OSError, TimeoutError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()


async def closed_by_peer(loop, sock, wait_s=0.5):
    """Reads what is there; whether the peer's end of the stream (EOF or a reset) follows."""
    end = time.monotonic() + wait_s
    try:
        while time.monotonic() < end:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20),
                                          max(0.01, end - time.monotonic()))
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
    return False


async def normal_clients(window_s):
    """C clients (a new connection per request) and one gRPC client, one request after
    another for window_s seconds; (http records, grpc records)."""
    client = http_client("close", args.normal_clients)
    end = time.monotonic() + window_s

    async def one_http():
        recs = []
        while time.monotonic() < end:
            recs.append(await http_stream(client))
        return recs

    async def one_grpc():
        recs = []
        while time.monotonic() < end:
            recs.append(await grpc_stream())
        return recs

    results = await asyncio.gather(*[one_http() for _ in range(args.normal_clients)],
                                   one_grpc())
    await client.close()
    return [r for rs in results[:-1] for r in rs], results[-1]


async def responsive(limit_s=30.0, fast_s=1.0):
    """Seconds until one streamed request completes within fast_s (None: not within limit_s)."""
    client = http_client("close", 1)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s:
            r = await http_stream(client)
            if r["outcome"] == "ok" and r["total_s"] < fast_s:
                return round(time.monotonic() - t0, 3)
            await asyncio.sleep(0.1)
        return None
    finally:
        await client.close()


async def stall_phase(kind):
    SAMPLER.set_phase(f"stall:{kind}")
    stop = asyncio.Event()
    before = tcp_counters()
    recs = [{} for _ in range(args.stalled if kind != "none" else 0)]
    pace = args.stall_connect_ms / 1000
    tasks = [asyncio.create_task(staller(kind, stop, r, i * pace)) for i, r in enumerate(recs)]
    if tasks:
        # All connected (and queued) ahead of the normal clients.
        await asyncio.sleep(len(tasks) * pace + 0.5)
    t0 = time.monotonic()
    if kind in ("no-read", "slow-headers"):
        # These stall until told to: at the window's end (requests still waiting then finish
        # once they are gone).
        asyncio.get_running_loop().call_later(args.stall_window, stop.set)
    http_recs, grpc_recs = await normal_clients(args.stall_window)
    window = time.monotonic() - t0
    if kind in ("half-body", "idle") and tasks:
        # How long the server holds them: they end when it answers or closes them.
        await asyncio.wait(tasks, timeout=HOLD_CAP_S)
    stop.set()
    await asyncio.gather(*tasks)
    out_kernel = counter_delta(before, tcp_counters())
    out = {"stalled": len(recs), "connected": sum(1 for r in recs if r.get("connected")),
           "window_s": round(window, 2), "normal_http": tally(http_recs, window),
           "control_grpc": tally(grpc_recs, window)}
    out["kernel_tcp"] = out_kernel
    held = [r["held_s"] for r in recs if "held_s" in r]
    if kind in ("half-body", "idle"):
        out["stall_still_held_at_cap"] = sum(1 for r in recs
                                             if r.get("connected") and "held_s" not in r)
    if kind == "no-read":
        out["stall_closed_by_server"] = sum(1 for r in recs if r.get("closed_by_server"))
    if held:
        out["stall_held_s"] = dist(held)
        out["stall_held_min_s"] = round(min(held), 3)
        out["stall_answers"] = dict(collections.Counter(r["answer"] for r in recs
                                                        if "answer" in r))
    errs = collections.Counter(r["error"] for r in recs if "error" in r)
    if errs:
        out["stall_errors"] = dict(errs)
    out["recovered_s"] = await responsive()
    out["resources_peak"] = SAMPLER.phase_peaks(f"stall:{kind}")
    return out


# --- the run ------------------------------------------------------------------------------------

REPORT = {"failures": [], "findings": [], "warnings": []}


def fail(msg):
    REPORT["failures"].append(msg)
    log(f"FAIL: {msg}")


async def references():
    client = http_client("close", 1)
    r = await http_stream(client)
    await client.close()
    if r["outcome"] != "ok":
        raise RuntimeError(f"the reference HTTP request failed: {r.get('message')}")
    g = await grpc_stream()
    if g["outcome"] != "ok":
        raise RuntimeError(f"the reference gRPC request failed: {g.get('message')}")
    return {"http_text": r["text"], "finish_reason": r["finish_reason"],
            "grpc_text": g["text"], "grpc_ids": g["ids"],
            "http_ttft_s": round(r["ttft_s"], 4), "http_total_s": round(r["total_s"], 4),
            "grpc_total_s": round(g["total_s"], 4)}


async def settle(baseline):
    """Waits (up to --settle-s) for the coordinator's descriptors to come back near the
    baseline and stay there 1 s; (seconds it took or None, the sample after)."""
    t0 = time.monotonic()
    back_since = None
    while time.monotonic() - t0 < args.settle_s:
        snap = SAMPLER.snapshot()
        c = snap.get("coordinator")
        if c and c["fds"] <= baseline["coordinator"]["fds"] + FD_SLACK:
            back_since = back_since or time.monotonic()
            if time.monotonic() - back_since >= 1.0:
                return round(back_since - t0, 2), snap
        else:
            back_since = None
        await asyncio.sleep(0.1)
    return None, SAMPLER.snapshot()


def check_streams(name, t):
    bad = {k: t[k] for k in ("mismatch", "refused_unclear", "hung", "reset", "error") if t[k]}
    if bad:
        msgs = "; ".join(f"{m['outcome']}: {m['message']}" for m in t["messages"]
                         if m["outcome"] != "refused")[:600]
        fail(f"{name}: {bad}" + (f" ({msgs})" if msgs else ""))


async def open_cluster_phases(logdir):
    cluster = Cluster("open", logdir)
    CLUSTERS.append(cluster)
    log(f"starting the open cluster (default admission limits) on {cluster.grpc} / "
        f"{cluster.http}")
    cluster.start()
    CURRENT.update(http=cluster.http, http_port=cluster.http_port, grpc=cluster.grpc)
    REPORT["http_listen_backlog"] = listen_backlog(cluster.http_port)
    REFS.update(await references())
    REPORT["reference"] = dict(REFS)
    if REFS["http_text"] != REFS["grpc_text"]:
        fail("the HTTP and gRPC references differ: "
             f"{REFS['http_text']!r} vs {REFS['grpc_text']!r}")
    # A few requests more, then idle: the baseline.
    client = http_client("close", 8)
    await asyncio.gather(*[http_stream(client) for _ in range(8)])
    await client.close()
    await asyncio.sleep(1.5)
    baseline = SAMPLER.snapshot()
    res = {"baseline": baseline, "rounds": []}
    REPORT["open"] = res
    for rnd in range(1, args.rounds + 1):
        phase = f"load{rnd}"
        SAMPLER.set_phase(phase)
        log(f"load round {rnd}: {args.streams} HTTP + {args.grpc_streams} gRPC streams at once")
        before = tcp_counters()
        t = await burst(args.streams, args.grpc_streams)
        t["kernel_tcp"] = counter_delta(before, tcp_counters())
        SAMPLER.set_phase(f"settle{rnd}")
        t["peak"] = SAMPLER.phase_peaks(phase)
        res["rounds"].append(t)
        h = t["http"]
        check_streams(f"load round {rnd} HTTP", t["http"])
        check_streams(f"load round {rnd} gRPC", t["grpc"])
        if not cluster.alive():
            raise RuntimeError(f"the open cluster lost a process: {cluster.exits()}")
        settled, after = await settle(baseline)
        t["settle_s"], t["after"] = settled, after
        log(f"  http: ok {h['ok']}/{h['opened']} in {h['wall_s']} s, peak open {h['peak_open']},"
            f" coordinator peak {t['peak'].get('coordinator')}, settled in {settled} s")
        if settled is None:
            fail(f"load round {rnd}: the coordinator's descriptors did not come back near the "
                 f"baseline ({baseline['coordinator']['fds']}) within {args.settle_s:g} s: "
                 f"{after.get('coordinator', {}).get('fds')}")
    if len(res["rounds"]) >= 2:
        # Memory the allocators keep after the first round is fine; more after every round
        # is a leak (RSS_SLACK_MIB over the later rounds: 4 KiB a stream at 2000 streams).
        first, last = res["rounds"][0]["after"], res["rounds"][-1]["after"]
        res["rss_growth_after_first_round_kib"] = {}
        for role in first:
            grew = last.get(role, {}).get("rss_kib", 0) - first[role]["rss_kib"]
            res["rss_growth_after_first_round_kib"][role] = grew
            if grew > RSS_SLACK_MIB * 1024:
                fail(f"{role}: RSS grew {grew / 1024:.1f} MiB from the end of round 1 to the end "
                     f"of round {len(res['rounds'])} (more than {RSS_SLACK_MIB} MiB: a leak?)")
    if args.pooled_streams > 0:
        SAMPLER.set_phase("pooled")
        log(f"pooled: {args.pooled_streams} streams through the openai client's default pool")
        before = tcp_counters()
        t = await burst(args.pooled_streams, 0, pool="default")
        t["kernel_tcp"] = counter_delta(before, tcp_counters())
        t["peak"] = SAMPLER.phase_peaks("pooled")
        SAMPLER.set_phase("settle-pooled")
        t["settle_s"], t["after"] = await settle(baseline)
        res["pooled"] = t
        check_streams("pooled HTTP", t["http"])
        log(f"  http: ok {t['http']['ok']}/{t['http']['opened']} in {t['http']['wall_s']} s")
    if KINDS:
        stalls = {}
        res["stalls"] = stalls
        for kind in ["none", *KINDS]:
            log(f"stall phase {kind}: {args.stalled if kind != 'none' else 0} stalled sockets, "
                f"{args.normal_clients} normal clients for {args.stall_window:g} s")
            s = await stall_phase(kind)
            stalls[kind] = s
            n = s["normal_http"]
            log(f"  normal http: ok {n['ok']}, hung {n['hung']}, ttft {n['ttft_s']}, "
                f"held {s.get('stall_held_s')}, recovered in {s['recovered_s']} s")
            check_streams(f"stall phase {kind}: normal HTTP clients", n)
            check_streams(f"stall phase {kind}: gRPC control", s["control_grpc"])
            SAMPLER.set_phase("settle-stall")
            await settle(baseline)
    settled, final = await settle(baseline)
    res["final"] = final
    res["peak_all"] = {}
    for phase in list(SAMPLER.peaks):
        for role, f in SAMPLER.phase_peaks(phase).items():
            p = res["peak_all"].setdefault(role, {k: 0 for k in f})
            for k in f:
                p[k] = max(p[k], f[k])
    res["hwm_end"] = {r: f["hwm_kib"] for r, f in final.items()}
    if not cluster.alive():
        raise RuntimeError(f"the open cluster lost a process: {cluster.exits()}")
    cluster.stop()
    CLUSTERS.remove(cluster)


async def limited_cluster_phase(logdir):
    flags = ["--max-outstanding-per-replica", str(args.max_outstanding_per_replica),
             "--max-queued", str(args.max_queued), "--queue-wait-ms", str(args.queue_wait_ms)]
    cluster = Cluster("limited", logdir, flags)
    CLUSTERS.append(cluster)
    log(f"starting the limited cluster ({' '.join(flags)})")
    cluster.start()
    CURRENT.update(http=cluster.http, http_port=cluster.http_port, grpc=cluster.grpc)
    refs = await references()
    if (refs["http_text"], refs["grpc_ids"]) != (REFS["http_text"], REFS["grpc_ids"]):
        fail("the limited cluster's references differ from the open cluster's")
    await asyncio.sleep(1.0)
    baseline = SAMPLER.snapshot()
    SAMPLER.set_phase("admission")
    log(f"admission: {args.streams} HTTP + {args.grpc_streams} gRPC streams at once")
    before = tcp_counters()
    t = await burst(args.streams, args.grpc_streams)
    t["kernel_tcp"] = counter_delta(before, tcp_counters())
    t["flags"] = flags
    t["baseline"] = baseline
    t["peak"] = SAMPLER.phase_peaks("admission")
    SAMPLER.set_phase("settle-admission")
    t["settle_s"], t["after"] = await settle(baseline)
    REPORT["admission"] = t
    h = t["http"]
    log(f"  http: ok {h['ok']}, refused {h['refused']}, unclear {h['refused_unclear']}, "
        f"hung {h['hung']}, reset {h['reset']}, error {h['error']}")
    check_streams("admission HTTP", t["http"])
    check_streams("admission gRPC", t["grpc"])
    if t["settle_s"] is None:
        fail("admission: the coordinator's descriptors did not come back near the baseline")
    if h["refused"] + t["grpc"]["refused"] == 0:
        REPORT["warnings"].append("admission: nothing was refused, so the refusals went untested"
                                  " (lower --max-outstanding-per-replica or --max-queued)")
    if not cluster.alive():
        raise RuntimeError(f"the limited cluster lost a process: {cluster.exits()}")
    cluster.stop()
    CLUSTERS.remove(cluster)


CLUSTERS = []


def findings():
    """Plain statements from the figures."""
    f = REPORT["findings"]
    o = REPORT.get("open", {})
    rounds = o.get("rounds", [])
    pooled = o.get("pooled")
    adm = REPORT.get("admission")
    cap = 2 * args.max_outstanding_per_replica + args.max_queued
    f.append(f"HTTP streams in flight are bounded by the coordinator's {args.http_threads} "
             f"httplib threads (peak open at the client: "
             f"{[r['http']['peak_open'] for r in rounds]}, accepted and queued in httplib's "
             "unbounded task queue): the admission limits of the limited cluster "
             f"(2 replicas x {args.max_outstanding_per_replica} in flight + {args.max_queued} "
             f"queued = {cap}) refuse HTTP requests only because {cap} < {args.http_threads}; "
             f"with 2 x --max-outstanding-per-replica + --max-queued >= {args.http_threads} no "
             "HTTP client ever "
             "gets a 429: the excess waits, unbounded, for a thread")
    if adm and adm["http"].get("refused_answer_s"):
        ra = adm["http"]["refused_answer_s"]
        f.append(f"a refused HTTP stream got its 429 only after waiting for an httplib thread: "
                 f"p50 {ra['p50']} s, p99 {ra['p99']} s after the request (the admission "
                 f"decision itself takes at most --queue-wait-ms {args.queue_wait_ms})")
    bl = REPORT.get("http_listen_backlog")
    if bl is not None and bl < 128:
        runs = [(f"round {i}", r) for i, r in enumerate(rounds, 1)]
        if pooled:
            runs.append(("pooled", pooled))
        if adm:
            runs.append(("admission", adm))
        k = "; ".join(f"{name}: {r.get('kernel_tcp')}" for name, r in runs)
        resets = sum(r["http"]["reset"] for _, r in runs)
        f.append(f"the HTTP port listens with a backlog of {bl} (cpp-httplib's "
                 f"CPPHTTPLIB_LISTEN_BACKLOG default): a burst of connects overflows it; the "
                 f"kernel drops the handshakes it cannot queue (the client's SYN or request is "
                 f"retried 1 s, 3 s, ... later) and {resets} HTTP streams of the bursts were "
                 f"reset before any response; kernel counters (whole namespace) {k}")
    if rounds and pooled:
        a = [r["http"].get("completed_per_s") for r in rounds]
        b = pooled["http"].get("completed_per_s")
        f.append(f"throughput: {a} streams/s with a connection per stream, {b} streams/s "
                 f"through the openai client's default keep-alive pool ({args.pooled_streams} "
                 f"streams, total p50 {pooled['http']['total_s']['p50']} s, p99 "
                 f"{pooled['http']['total_s']['p99']} s): an idle keep-alive connection holds "
                 "a server thread until httplib's 5 s keep-alive timeout, so while the pool "
                 f"keeps connections idle at most {args.http_threads} / 5 s = "
                 f"{args.http_threads / 5:.1f} requests a second get a thread")
    stalls = o.get("stalls", {})
    base = stalls.get("none", {}).get("normal_http", {})
    for kind, s in stalls.items():
        if kind == "none" or not base:
            continue
        n = s["normal_http"]
        b99, k99 = base["ttft_s"]["p99"] or 0, n["ttft_s"]["p99"] or 0
        bmax, kmax = base["ttft_s"]["max"] or 0, n["ttft_s"]["max"] or 0
        delayed = k99 - b99 >= 1.0 or kmax - bmax >= 2.0 or n["hung"] > 0
        held = s.get("stall_held_s")
        fds = s["resources_peak"].get("coordinator", {}).get("fds")
        f.append(f"{s['stalled']} '{kind}' sockets: normal HTTP clients "
                 f"{'DELAYED' if delayed else 'not delayed'}: time to first token p50 "
                 f"{n['ttft_s']['p50']} s, p99 {n['ttft_s']['p99']} s, max {n['ttft_s']['max']} s"
                 f" (without: p50 {base['ttft_s']['p50']} s, p99 {base['ttft_s']['p99']} s); "
                 f"{n['ok']} requests completed in the {s['window_s']} s window (without: "
                 f"{base['ok']}); hung {n['hung']}; coordinator peak fds {fds}"
                 + (f"; each stalled socket held (queueing included) p50 {held['p50']} s, "
                    f"max {held['max']} s, then {s.get('stall_answers')}" if held else "")
                 + (f"; the server had closed {s['stall_closed_by_server']} of them by the "
                    "phase's end" if "stall_closed_by_server" in s else "")
                 + f"; gRPC control p50 {s['control_grpc']['total_s']['p50']} s (without: "
                 f"{stalls['none']['control_grpc']['total_s']['p50']} s)")
    if adm and adm["http"].get("refused"):
        ra = adm["http"].get("retry_after_header", 0)
        f.append(f"refusals: {adm['http']['refused']} HTTP (status "
                 f"{adm['http'].get('refused_status')}), {adm['grpc']['refused']} gRPC; "
                 f"{ra} of the HTTP ones carried a Retry-After header")
        dup = [m["message"] for m in adm["http"]["messages"]
               if m["message"].count("retry later or add replicas") > 1]
        if dup:
            f.append(f"the queue-full message repeats its advice: {dup[0]!r}")
    growth = o.get("rss_growth_after_first_round_kib")
    if growth:
        f.append("RSS growth from the end of round 1 to the end of the last round (KiB): "
                 f"{growth}")


def fmt_res(f):
    if not f:
        return "-"
    return (f"RSS {f['rss_kib'] / 1024:.1f} MiB, fds {f['fds']}, threads {f['threads']}")


def summary():
    out = []
    p = out.append
    m = REPORT.get("machine", {})
    p(f"load test: {m.get('cores')} cores, {m.get('mem_gib')} GiB, load average at start "
      f"{m.get('loadavg')}, at the end {m.get('loadavg_end')}; {args.streams} streams, "
      f"max_tokens {args.max_tokens}")
    ref = REPORT.get("reference")
    if ref:
        p(f"reference: {ref['http_text']!r} (finish {ref['finish_reason']}, "
          f"{len(ref['grpc_ids'])} tokens; gRPC text "
          f"{'the same' if ref['grpc_text'] == ref['http_text'] else 'DIFFERENT'})")
    p(f"HTTP listen backlog: {REPORT.get('http_listen_backlog')}")
    o = REPORT.get("open")
    if o:
        for role in ("coordinator", "worker1", "worker2"):
            p(f"{role:11s} baseline  {fmt_res(o['baseline'].get(role))}")
        for i, r in enumerate(o.get("rounds", []), 1):
            h, g = r["http"], r["grpc"]
            p(f"load round {i}: HTTP opened {h['opened']} (peak open {h['peak_open']}), "
              f"accepted {h['accepted']}, ok {h['ok']}, mismatch {h['mismatch']}, refused "
              f"{h['refused']}, hung {h['hung']}, reset {h['reset']}, error {h['error']}; "
              f"{h['wall_s']} s, "
              f"{h['completed_per_s']} streams/s; ttft p50 {h['ttft_s']['p50']} p99 "
              f"{h['ttft_s']['p99']} s, total p50 {h['total_s']['p50']} p99 "
              f"{h['total_s']['p99']} s")
            p(f"             gRPC opened {g['opened']}, accepted {g['accepted']}, ok {g['ok']}, "
              f"mismatch {g['mismatch']}, "
              f"refused {g['refused']}, hung {g['hung']}, error {g['error']}; total p50 "
              f"{g['total_s']['p50']} p99 {g['total_s']['p99']} s; kernel "
              f"{r.get('kernel_tcp')}")
            for role in ("coordinator", "worker1", "worker2"):
                p(f"  {role:11s} peak {fmt_res(r['peak'].get(role))}; after (settled in "
                  f"{r.get('settle_s')} s) {fmt_res(r.get('after', {}).get(role))}")
        pl = o.get("pooled")
        if pl:
            h = pl["http"]
            p(f"pooled (openai default pool): opened {h['opened']}, ok {h['ok']}, hung "
              f"{h['hung']}, reset {h['reset']}, error {h['error']}; {h['wall_s']} s, "
              f"{h['completed_per_s']} "
              f"streams/s; total p50 {h['total_s']['p50']} p99 {h['total_s']['p99']} s; "
              f"coordinator peak {fmt_res(pl['peak'].get('coordinator'))}; kernel "
              f"{pl.get('kernel_tcp')}")
        for kind, s in o.get("stalls", {}).items():
            n, g = s["normal_http"], s["control_grpc"]
            p(f"stall {kind:12s}: {s['connected']}/{s['stalled']} stalled; normal HTTP ok "
              f"{n['ok']} hung {n['hung']} err {n['error'] + n['reset']}; ttft p50 "
              f"{n['ttft_s']['p50']} p99 {n['ttft_s']['p99']} max {n['ttft_s']['max']} s; "
              f"total p50 {n['total_s']['p50']} p99 {n['total_s']['p99']} s; gRPC control "
              f"ok {g['ok']} p50 {g['total_s']['p50']} max {g['total_s']['max']} s; "
              f"recovered in {s['recovered_s']} s; coordinator peak "
              f"{fmt_res(s['resources_peak'].get('coordinator'))}; kernel {s['kernel_tcp']}")
            if "stall_held_s" in s or "stall_still_held_at_cap" in s:
                p(f"  stalled sockets held (until answered or closed) {s.get('stall_held_s')}, "
                  f"answers {s.get('stall_answers')}; still unanswered {HOLD_CAP_S} s after "
                  f"the window: {s.get('stall_still_held_at_cap')} (a socket whose handshake "
                  "the full listen queue dropped, and that then sends nothing, never reaches "
                  "the server: compare the coordinator's peak fds)")
            if "stall_closed_by_server" in s:
                p(f"  no-read sockets the server had closed by the end of the phase: "
                  f"{s['stall_closed_by_server']} of {s['connected']}")
        if "final" in o:
            for role in ("coordinator", "worker1", "worker2"):
                p(f"{role:11s} peak (all phases) {fmt_res(o['peak_all'].get(role))}, VmHWM "
                  f"{o['hwm_end'].get(role, 0) / 1024:.1f} MiB; final "
                  f"{fmt_res(o['final'].get(role))}")
    a = REPORT.get("admission")
    if a:
        h, g = a["http"], a["grpc"]
        p(f"admission ({' '.join(a['flags'])}): HTTP opened {h['opened']}, accepted "
          f"{h['accepted']}, ok {h['ok']}, "
          f"refused {h['refused']} (status {h.get('refused_status')}, answered p50 "
          f"{h.get('refused_answer_s', {}).get('p50')} p99 "
          f"{h.get('refused_answer_s', {}).get('p99')} s), unclear {h['refused_unclear']}, "
          f"mismatch {h['mismatch']}, hung {h['hung']}, reset {h['reset']}, error "
          f"{h['error']}; gRPC opened {g['opened']}, accepted {g['accepted']}, ok {g['ok']}, "
          f"refused {g['refused']}, "
          f"unclear {g['refused_unclear']}, other {g['hung'] + g['reset'] + g['error']}")
        for role in ("coordinator", "worker1", "worker2"):
            p(f"  {role:11s} baseline {fmt_res(a['baseline'].get(role))}; peak "
              f"{fmt_res(a['peak'].get(role))}; after {fmt_res(a['after'].get(role))}")
        for api in ("http", "grpc"):
            for msg in a[api]["messages"][:4]:
                p(f"  {api} {msg['outcome']} x{msg['count']} [{msg['status']}]: "
                  f"{msg['message']}")
    for x in REPORT["findings"]:
        p(f"finding: {x}")
    for x in REPORT["warnings"]:
        p(f"warning: {x}")
    for x in REPORT["failures"]:
        p(f"FAILURE: {x}")
    p(f"result: {'FAIL' if REPORT['failures'] else 'PASS'} in {time.monotonic() - T0:.1f} s")
    return "\n".join(out)


def machine():
    try:
        with open("/proc/meminfo") as f:
            mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
    except (OSError, AttributeError):
        mem, load = 0, None
    return {"cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "loadavg": load,
            "python": sys.version.split()[0], "openai": openai.__version__}


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 4 * (args.streams + args.pooled_streams + args.stalled) + 1024)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    REPORT["nofile_limit"] = want
    if want < 2 * args.streams + 256:
        REPORT["warnings"].append(f"the descriptor limit is {want}: too low for "
                                  f"{args.streams} streams")


async def main_async(logdir):
    try:
        async with asyncio.timeout(args.timeout):
            await open_cluster_phases(logdir)
            await limited_cluster_phase(logdir)
    except TimeoutError:
        fail(f"the run did not finish within --timeout {args.timeout:g} s")


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main():
    for b in ("gemma-coordinator", "gemma-worker", "gemmactl"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            print(f"load_test: {os.path.join(BIN, b)} is missing (build it first)",
                  file=sys.stderr)
            return 2
    raise_fd_limit()
    REPORT["machine"] = machine()
    REPORT["config"] = vars(args)
    logdir = tempfile.mkdtemp(prefix="gemma-load-")
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    # The last resort if the event loop itself is stuck: kill everything and leave.
    watchdog = threading.Timer(args.timeout + 60, lambda: (kill_everything(), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    SAMPLER.start()
    code = 0
    try:
        asyncio.run(main_async(logdir))
    except KeyboardInterrupt:
        fail("interrupted")
        code = 130
    except RuntimeError as e:
        fail(str(e))
        code = 2
    except Exception as e:  # keep the cleanup and the account of what ran
        fail(f"unexpected {type(e).__name__}: {e}")
        code = 1
    finally:
        for c in list(CLUSTERS):
            c.stop()
        kill_everything()
        SAMPLER.stop.set()
        watchdog.cancel()
    try:
        with open("/proc/loadavg") as f:
            REPORT["machine"]["loadavg_end"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        findings()
    except (KeyError, TypeError, ValueError) as e:  # a phase cut short
        REPORT["warnings"].append(f"findings incomplete: {type(e).__name__}: {e}")
    text = summary()
    print(text)
    REPORT["elapsed_s"] = round(time.monotonic() - T0, 1)
    REPORT["result"] = "fail" if REPORT["failures"] else "pass"
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(REPORT, f, indent=1, default=str)
    if REPORT["failures"] or args.keep_logs:
        print(f"logs: {logdir}", file=sys.stderr)
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    if code:
        return code
    return 1 if REPORT["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
