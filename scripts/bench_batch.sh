#!/usr/bin/env bash
# Batch throughput against the same requests as concurrent streams, and interactive time to first
# token with and without a running batch (scripts/bench_batch.py, the official openai client),
# on a coordinator with a data dir and WORKERS (default 2) single-rank workers of the tiny MoE
# checkpoint. Everything started here is stopped on exit.
#   scripts/bench_batch.sh [BUILD_DIR] [bench_batch.py flags...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${repo}/build}"
shift || true
workers="${WORKERS:-2}"
log() { echo "bench_batch: $*" >&2; }

"${repo}/scripts/python_env.sh"
cmake -S "${repo}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target gemma-coordinator gemma-worker >/dev/null

# shellcheck source=scripts/bench_lib.sh
source "${repo}/scripts/bench_lib.sh"
bench_start_cleanup

coordinator="127.0.0.1:$(bench_free_port)"
http="127.0.0.1:$(bench_free_port)"
model="${repo}/tests/golden/data/tiny-moe"
"${build}/bin/gemma-coordinator" --listen "${coordinator}" --http-listen "${http}" --insecure \
  --data-dir "${work}/data" --served-model-name tiny-moe 2>"${work}/coordinator.log" >/dev/null &
pids+=($!)
for w in $(seq 1 "${workers}"); do
  "${build}/bin/gemma-worker" --coordinator "${coordinator}" --model "${model}" --threads 1 \
    >/dev/null 2>"${work}/worker${w}.log" &
  pids+=($!)
done
for _ in $(seq 1 300); do
  healthy="$(grep -c "registered at" "${work}/coordinator.log" || true)"
  (( healthy >= workers )) && break
  sleep 0.1
done
log "coordinator ${coordinator}, HTTP ${http}, ${workers} workers; $(nproc) cores, $(date -u +%F)"
"${repo}/.venv-test/bin/python" "${repo}/scripts/bench_batch.py" "http://${http}/v1" tiny-moe "$@"
