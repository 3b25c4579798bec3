#!/usr/bin/env bash
# Serving under pressure: short-request latency (p50, p99) and throughput with 0, 6 and 20 long
# requests (max_tokens 4000) running, on one default gemma-worker of the tiny MoE checkpoint
# (16,384 cached positions), for each KV admission rule (--kv-admission first-chunk, the rule
# before, and reserve), side by side in one run (scripts/bench_pressure.py, the official openai
# client). Everything started here is stopped on exit.
#   scripts/bench_pressure.sh [BUILD_DIR] [--seconds T]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${repo}/build}"
shift || true
log() { echo "bench_pressure: $*" >&2; }

"${repo}/scripts/python_env.sh"
cmake -S "${repo}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target gemma-coordinator gemma-worker >/dev/null

# shellcheck source=scripts/bench_lib.sh
source "${repo}/scripts/bench_lib.sh"
bench_start_cleanup
model="${repo}/tests/golden/data/tiny-moe"
log "$(nproc) cores, $(date -u +%F)"
for admission in first-chunk reserve; do
  for long in 0 6 20; do
    coordinator="127.0.0.1:$(bench_free_port)"
    http="127.0.0.1:$(bench_free_port)"
    "${build}/bin/gemma-coordinator" --listen "${coordinator}" --http-listen "${http}" \
      --insecure --served-model-name tiny-moe --max-outstanding-per-replica 1024 \
      2>"${work}/coordinator-${admission}-${long}.log" >/dev/null &
    coordinator_pid=$!
    "${build}/bin/gemma-worker" --coordinator "${coordinator}" --model "${model}" --threads 1 \
      --kv-admission "${admission}" >/dev/null 2>"${work}/worker-${admission}-${long}.log" &
    worker_pid=$!
    pids+=("${coordinator_pid}" "${worker_pid}")
    for _ in $(seq 1 300); do
      grep -q "registered at" "${work}/coordinator-${admission}-${long}.log" && break
      sleep 0.1
    done
    "${repo}/.venv-test/bin/python" "${repo}/scripts/bench_pressure.py" "http://${http}/v1" \
      tiny-moe --long "${long}" --label "${admission}" "$@"
    kill -9 "${worker_pid}" "${coordinator_pid}" 2>/dev/null || true
    wait "${worker_pid}" "${coordinator_pid}" 2>/dev/null || true
  done
done
