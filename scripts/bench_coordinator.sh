#!/usr/bin/env bash
# The coordinator's cost: starts a coordinator and one single-rank worker on the tiny MoE
# checkpoint, then runs bench/coordinator_bench.cc, which sends the same streaming requests
# straight to the replica leader and through the coordinator (alternating) and prints the added
# latency to the first response and per streamed response, and requests/s with many concurrent
# streams on both paths. Everything started here is stopped on exit.
#   scripts/bench_coordinator.sh [BUILD_DIR] [coordinator_bench flags...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${repo}/build}"
shift || true
log() { echo "bench_coordinator: $*" >&2; }

cmake -S "${repo}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target gemma-coordinator gemma-worker coordinator_bench >/dev/null

# shellcheck source=scripts/bench_lib.sh
source "${repo}/scripts/bench_lib.sh"
bench_start_cleanup

port="$(bench_free_port)"
coordinator="127.0.0.1:${port}"
"${build}/bin/gemma-coordinator" --listen "${coordinator}" --insecure 2>"${work}/coordinator.log" &
pids+=($!)
"${build}/bin/gemma-worker" --coordinator "${coordinator}" --model "${repo}/tests/golden/data/tiny-moe" \
  --threads 1 >"${work}/worker.out" 2>"${work}/worker.log" &
pids+=($!)

replica=""
for _ in $(seq 1 300); do
  replica="$(sed -n 's/^replica serving on //p' "${work}/worker.out" | head -n 1)"
  [[ -n "${replica}" ]] && break
  sleep 0.1
done
if [[ -z "${replica}" ]]; then
  log "the worker did not start; its log:"
  tail -n 20 "${work}/worker.log" >&2
  exit 1
fi
log "coordinator ${coordinator}, replica leader ${replica}; $(nproc) cores, $(date -u +%F)"
"${build}/bin/coordinator_bench" --coordinator "${coordinator}" --replica "${replica}" "$@"
