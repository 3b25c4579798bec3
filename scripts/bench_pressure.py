"""Short-request latency and throughput while long requests run, on a running coordinator (its
HTTP port) through the official openai client.

  bench_pressure.py BASE_URL MODEL --long N [--seconds T] [--short-clients C]

N streams of long greedy completions (max_tokens 4000) run in the background; C clients send
short completions (max_tokens 16, greedy, 60 s timeout) one after another for T seconds. Prints
one JSON line: short requests done, failed, per second, latency p50 / p99 (s), and the long
requests' tokens in the window.
"""
import argparse
import concurrent.futures
import json
import statistics
import threading
import time

import openai

parser = argparse.ArgumentParser()
parser.add_argument("base_url")
parser.add_argument("model")
parser.add_argument("--long", type=int, default=0)
parser.add_argument("--seconds", type=float, default=15)
parser.add_argument("--short-clients", type=int, default=8)
parser.add_argument("--label", default="")
args = parser.parse_args()
client = openai.OpenAI(base_url=args.base_url, api_key="-", max_retries=0, timeout=60)

stop = threading.Event()
long_tokens = [0]
lock = threading.Lock()


def long_stream(i):
    try:
        for chunk in client.completions.create(model=args.model, prompt=f"Long story {i}:",
                                               max_tokens=4000, temperature=0, stream=True):
            if stop.is_set():
                break
            with lock:
                long_tokens[0] += 1
    except Exception:  # the stream is cut when the phase ends
        pass


def short_client(k):
    latencies, failed = [], 0
    i = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client.completions.create(model=args.model, prompt=f"Short {k} {i}", max_tokens=16,
                                      temperature=0)
            latencies.append(time.monotonic() - t0)
        except Exception:
            failed += 1
        i += 1
    return latencies, failed


longs = [threading.Thread(target=long_stream, args=(i,), daemon=True) for i in range(args.long)]
for t in longs:
    t.start()
time.sleep(2 if args.long else 0)  # the long ones admitted and decoding
with lock:
    long_tokens[0] = 0
start = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(args.short_clients) as pool:
    futures = [pool.submit(short_client, k) for k in range(args.short_clients)]
    time.sleep(args.seconds)
    stop.set()
    results = [f.result() for f in futures]
elapsed = time.monotonic() - start
lat = sorted(x for r in results for x in r[0])
failed = sum(r[1] for r in results)


def pct(p):
    return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")


print(json.dumps({"label": args.label, "long": args.long, "short_done": len(lat),
                  "short_failed": failed, "short_per_s": len(lat) / elapsed,
                  "p50_s": pct(0.5), "p99_s": pct(0.99),
                  "long_tokens_per_s": long_tokens[0] / elapsed}))
