"""Rank balancedness and step time before and after a live expert rebalance, on a running
coordinator (its HTTP port) serving one dp-ep replica, under steady streamed load.

  bench_rebalance.py HTTP_URL MODEL GEMMACTL COORDINATOR [--streams S] [--seconds T]

Phase A: S concurrent streams of greedy completions (KJV-like prompts) for T seconds; then
`gemmactl rebalance --wait`; phase B the same. For each phase: the mean inter-token latency from
/metrics (gemma:inter_token_latency_seconds, sum and count deltas: one decode step of the
replica per token under continuous batching), tokens per second, and the replica's rank
balancedness the coordinator recorded for the switch: before (fitted windows, old placement),
predicted (same windows, new placement) and measured (windows after the switch); gemmactl's
definition: mean over layers of mean / max tokens per rank, each expert's tokens split over its
copies. Prints a Markdown table and JSON.
"""
import argparse
import concurrent.futures
import json
import re
import subprocess
import threading
import time
import urllib.request

import openai

parser = argparse.ArgumentParser()
parser.add_argument("http")
parser.add_argument("model")
parser.add_argument("gemmactl")
parser.add_argument("coordinator")
parser.add_argument("--streams", type=int, default=8)
parser.add_argument("--seconds", type=float, default=20)
parser.add_argument("--max-tokens", type=int, default=48)
parser.add_argument("--control", action="store_true",
                    help="no rebalance between the phases: what the phases differ by alone")
args = parser.parse_args()
client = openai.OpenAI(base_url=args.http + "/v1", api_key="-", max_retries=0, timeout=600)

OPENINGS = ["And it came to pass", "In the beginning", "And the LORD spake unto Moses",
            "Blessed are the", "And Jesus answered and said", "The heavens declare",
            "Then said he unto them", "And the king said"]


def itl():
    text = urllib.request.urlopen(args.http + "/metrics").read().decode()
    s = re.search(r"^gemma:inter_token_latency_seconds_sum (\S+)$", text, re.M)
    c = re.search(r"^gemma:inter_token_latency_seconds_count (\S+)$", text, re.M)
    return float(s.group(1)), float(c.group(1))


def expert_load():
    out = subprocess.run([args.gemmactl, "--coordinator", args.coordinator, "experts", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def phase(name):
    stop = time.monotonic() + args.seconds
    tokens = [0]
    lock = threading.Lock()

    def client_loop(k):
        i = 0
        while time.monotonic() < stop:
            r = client.completions.create(model=args.model,
                                          prompt=f"{OPENINGS[(k + i) % len(OPENINGS)]} {i}",
                                          max_tokens=args.max_tokens, temperature=0)
            with lock:
                tokens[0] += r.usage.completion_tokens
            i += 1

    s0, c0 = itl()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        list(pool.map(client_loop, range(args.streams)))
    elapsed = time.monotonic() - t0
    s1, c1 = itl()
    time.sleep(1.5)  # the last windows arrive with the next heartbeats
    return {"phase": name, "itl_ms": 1000 * (s1 - s0) / max(1, c1 - c0),
            "tokens_per_s": tokens[0] / elapsed}


a = phase("before")
if args.control:
    print("control run: no rebalance between the phases")
else:
    rebalance = subprocess.run([args.gemmactl, "--coordinator", args.coordinator, "rebalance",
                                "--wait"], capture_output=True, text=True)
    print(rebalance.stdout.strip())
    if rebalance.returncode != 0:
        raise SystemExit("rebalance failed: " + rebalance.stderr)
b = phase("after")
load = expert_load()
record = None
for r in load.get("replicas", []):
    if r.get("switches"):
        record = r["switches"][-1]
print()
print("| phase | rank balancedness | mean inter-token latency (ms) | tokens/s |")
print("|---|---:|---:|---:|")
before = record.get("balancedness_before", 0) if record else 0
measured = record.get("balancedness_measured", -1) if record else -1
if record is None:
    print(f"| first (epoch 0) | - | {a['itl_ms']:.1f} | {a['tokens_per_s']:.1f} |")
    print(f"| second (epoch 0) | - | {b['itl_ms']:.1f} | {b['tokens_per_s']:.1f} |")
else:
    print(f"| before (epoch 0) | {before:.3f} | {a['itl_ms']:.1f} | {a['tokens_per_s']:.1f} |")
    print(f"| after (epoch 1; predicted {record.get('balancedness_predicted', 0):.3f}) | "
          f"{measured:.3f} | {b['itl_ms']:.1f} | {b['tokens_per_s']:.1f} |")
print(json.dumps({"before": a, "after": b, "switch": record}))
