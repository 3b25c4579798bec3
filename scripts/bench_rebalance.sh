#!/usr/bin/env bash
# Live expert rebalancing on the CPU demo cluster: a dp-ep replica of the demo model (4 rank
# processes, 4 spare expert slots) under steady streamed load (scripts/bench_rebalance.py, the
# official openai client); rank balancedness and step time (mean inter-token latency) before and
# after `gemmactl rebalance --wait`, side by side in one run. The windows are recorded with
# `gemmactl experts --record` to OUT (default /tmp/kjv-moe-trace.jsonl) for gemma-eplb-sim.
#   scripts/bench_rebalance.sh [BUILD_DIR] [bench_rebalance.py flags...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${repo}/build}"
shift || true
trace="${OUT:-/tmp/kjv-moe-trace.jsonl}"
log() { echo "bench_rebalance: $*" >&2; }

"${repo}/scripts/python_env.sh"
cmake -S "${repo}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target gemma-coordinator gemma-worker gemmactl >/dev/null

# shellcheck source=scripts/bench_lib.sh
source "${repo}/scripts/bench_lib.sh"
bench_start_cleanup

coordinator="127.0.0.1:$(bench_free_port)"
http="127.0.0.1:$(bench_free_port)"
model="${repo}/models/kjv-moe"
"${build}/bin/gemma-coordinator" --listen "${coordinator}" --http-listen "${http}" --insecure \
  --rebalance-threshold 0 --served-model-name kjv-moe 2>"${work}/coordinator.log" >/dev/null &
pids+=($!)
"${build}/bin/gemma-worker" --coordinator "${coordinator}" --model "${model}" --threads 1 \
  --cpu-ranks 4 --mode dp-ep --tp 1 --redundant-experts 4 >/dev/null 2>"${work}/worker.log" &
pids+=($!)
for _ in $(seq 1 600); do
  healthy="$(grep -c "registered at" "${work}/coordinator.log" || true)"
  (( healthy >= 4 )) && break
  sleep 0.1
done
rm -f "${trace}"
"${build}/bin/gemmactl" --coordinator "${coordinator}" experts --record "${trace}" \
  2>/dev/null &
pids+=($!)
log "coordinator ${coordinator}, HTTP ${http}, dp-ep replica of 4 ranks; $(nproc) cores, $(date -u +%F)"
"${repo}/.venv-test/bin/python" "${repo}/scripts/bench_rebalance.py" "http://${http}" kjv-moe \
  "${build}/bin/gemmactl" "${coordinator}" "$@"
log "trace: $(wc -l <"${trace}") windows in ${trace}"
