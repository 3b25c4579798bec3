"""Batch jobs against concurrent streams, and interactive latency under a running batch, on a
running coordinator (its HTTP port) through the official openai client.

  bench_batch.py BASE_URL MODEL [--items N] [--max-tokens T] [--streams S] [--probes P]

1. The same N completions (greedy, T tokens each) as one batch (create to completed) and as N
   streamed requests over S concurrent connections: items/s and generated tokens/s of each.
2. Time to first token of P interactive streamed chats one after another, with no batch, then
   while a batch of 2N items runs: median and 90th percentile.
Prints a Markdown table and one JSON line.
"""
import argparse
import concurrent.futures
import io
import json
import statistics
import time

import openai

parser = argparse.ArgumentParser()
parser.add_argument("base_url")
parser.add_argument("model")
parser.add_argument("--items", type=int, default=200)
parser.add_argument("--max-tokens", type=int, default=16)
parser.add_argument("--streams", type=int, default=8)
parser.add_argument("--probes", type=int, default=20)
args = parser.parse_args()
client = openai.OpenAI(base_url=args.base_url, api_key="-", max_retries=0, timeout=600)


def prompt(i):
    return f"And it came to pass on the {i}th day that"


def run_batch(n, offset=0):
    lines = "\n".join(json.dumps({
        "custom_id": f"r{offset + i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": args.model, "prompt": prompt(i), "max_tokens": args.max_tokens,
                 "temperature": 0}}) for i in range(n))
    f = client.files.create(file=("bench.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                 completion_window="24h")


def wait_batch(batch):
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    return batch


def stream_one(i):
    tokens = 0
    for chunk in client.completions.create(model=args.model, prompt=prompt(i),
                                           max_tokens=args.max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


def ttft():
    start = time.perf_counter()
    for chunk in client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": "In the beginning"}],
            max_tokens=4, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - start
    return time.perf_counter() - start


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


results = {}
start = time.perf_counter()
batch = wait_batch(run_batch(args.items))
elapsed = time.perf_counter() - start
results["batch"] = {"seconds": elapsed, "items_per_s": args.items / elapsed,
                    "tokens_per_s": batch.usage.output_tokens / elapsed,
                    "status": batch.status}
start = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
    tokens = sum(pool.map(stream_one, range(args.items)))
elapsed = time.perf_counter() - start
results["streams"] = {"seconds": elapsed, "items_per_s": args.items / elapsed,
                      "tokens_per_s": tokens / elapsed}

ttft()  # warm
idle = [ttft() for _ in range(args.probes)]
running = run_batch(2 * args.items, offset=args.items)
time.sleep(0.5)
busy = [ttft() for _ in range(args.probes)]
busy_batch = client.batches.retrieve(running.id)
results["ttft_idle"] = {"median": statistics.median(idle), "p90": percentile(idle, 0.9)}
results["ttft_batch"] = {"median": statistics.median(busy), "p90": percentile(busy, 0.9),
                         "batch_done_during_probes": busy_batch.request_counts.completed}
wait_batch(running)

print(f"| what | seconds | items/s | tokens/s |")
print(f"|---|---|---|---|")
for name in ("batch", "streams"):
    r = results[name]
    print(f"| {args.items} items as {name} | {r['seconds']:.2f} | {r['items_per_s']:.1f} | "
          f"{r['tokens_per_s']:.1f} |")
print()
print("| interactive TTFT | median ms | p90 ms |")
print("|---|---|---|")
for name, label in (("ttft_idle", "no batch"), ("ttft_batch", "batch running")):
    r = results[name]
    print(f"| {label} | {1000 * r['median']:.1f} | {1000 * r['p90']:.1f} |")
print(json.dumps(results))
