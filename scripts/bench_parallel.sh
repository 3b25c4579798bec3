#!/usr/bin/env bash
# Weight memory per rank, decode step time and bytes sent per decode step of `gemma-bench` with
# the model spread over W ranks, on the engine-core benchmark checkpoint of scripts/bench_cpu.sh
# (random Gemma 4-shaped MoE, 288.7M fp32 parameters).
#
#   scripts/bench_parallel.sh [--prompt-len 128] [--decode-tokens 64] [--runs 5]
#
# Runs tp mode at W = 1, 2, 4 and dp-ep mode at W = 2, each with the ranks as threads of one
# process (--tp W / --mode dp-ep --ep W, in-process communicators) and as one process per rank
# (--world-size W --rank R --rendezvous 127.0.0.1:PORT, Gloo over loopback). Every rank gets
# max(1, nproc / W) CPU threads, so the total is nproc unless W > nproc, where the machine is
# oversubscribed (the script says so). Prints one markdown table; the JSON of every run is kept
# in <build>/bench-parallel/.
#
# Builds gemma-bench in <repo>/build and writes the checkpoint once to <repo>/build/bench-model
# (the same one scripts/bench_cpu.sh uses).
#
# Environment:
#   BENCH_BUILD_DIR=DIR    build (and keep the checkpoint) in DIR instead of <repo>/build
#   BENCH_PYTHON=PATH      interpreter with torch, transformers and safetensors to write the
#                          checkpoint with (default: <repo>/.venv-bench/bin/python, made by
#                          scripts/bench_cpu.sh)
#   BENCH_PORT=N           first rendezvous port for the process runs (default 29650)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BENCH_BUILD_DIR:-${REPO}/build}"
MODEL_DIR="${BUILD}/bench-model"
OUT_DIR="${BUILD}/bench-parallel"
PY="${BENCH_PYTHON:-${REPO}/.venv-bench/bin/python}"
PORT="${BENCH_PORT:-29650}"

PROMPT_LEN=128
DECODE_TOKENS=64
RUNS=5

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prompt-len) PROMPT_LEN="$2"; shift 2 ;;
    --prompt-len=*) PROMPT_LEN="${1#*=}"; shift ;;
    --decode-tokens) DECODE_TOKENS="$2"; shift 2 ;;
    --decode-tokens=*) DECODE_TOKENS="${1#*=}"; shift ;;
    --runs) RUNS="$2"; shift 2 ;;
    --runs=*) RUNS="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench_parallel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in "${PROMPT_LEN}" "${DECODE_TOKENS}" "${RUNS}" "${PORT}"; do
  if ! [[ "$v" =~ ^[1-9][0-9]*$ ]]; then
    echo "bench_parallel.sh: --prompt-len, --decode-tokens, --runs and BENCH_PORT take" \
      "positive integers" >&2
    exit 2
  fi
done

log() { echo "[bench_parallel] $*" >&2; }

# --- gemma-bench and the checkpoint -------------------------------------------------------------
source "${REPO}/scripts/bench_lib.sh"
BENCH_BIN="$(bench_build_target "${BUILD}" gemma-bench)"
bench_ensure_model "${PY}" "${MODEL_DIR}"

# --- the runs -----------------------------------------------------------------------------------
NPROC="$(nproc)"
mkdir -p "${OUT_DIR}"
rm -f "${OUT_DIR}"/*.json "${OUT_DIR}"/*.log
COMMON=(--model "${MODEL_DIR}" --prompt-len "${PROMPT_LEN}" --decode-tokens "${DECODE_TOKENS}"
        --runs "${RUNS}" --json)

threads_for() {  # threads per rank at W ranks
  local t=$((NPROC / $1))
  echo $((t > 0 ? t : 1))
}

# run_threads NAME W FLAGS...: the W ranks as threads of one process.
run_threads() {
  local name="$1" w="$2"
  shift 2
  log "${name}: gemma-bench $* --threads $(threads_for "${w}")"
  "${BENCH_BIN}" "${COMMON[@]}" "$@" --threads "$(threads_for "${w}")" \
    2> "${OUT_DIR}/${name}.log" | tail -n 1 > "${OUT_DIR}/${name}.json"
}

# run_processes NAME W FLAGS...: one process per rank, rendezvous on 127.0.0.1.
run_processes() {
  local name="$1" w="$2"
  shift 2
  local port="${PORT}"
  PORT=$((PORT + 1))
  log "${name}: ${w} x gemma-bench $* --threads $(threads_for "${w}")" \
    "--world-size ${w} --rendezvous 127.0.0.1:${port}"
  local pids=() r
  for ((r = w - 1; r >= 0; --r)); do
    local out=/dev/null
    if ((r == 0)); then out="${OUT_DIR}/${name}.out"; fi
    "${BENCH_BIN}" "${COMMON[@]}" "$@" --threads "$(threads_for "${w}")" --world-size "${w}" \
      --rank "${r}" --rendezvous "127.0.0.1:${port}" > "${out}" 2> "${OUT_DIR}/${name}.${r}.log" &
    pids+=($!)
  done
  local failed=0 pid
  for pid in "${pids[@]}"; do
    wait "${pid}" || failed=1
  done
  if ((failed)); then
    echo "bench_parallel.sh: ${name} failed; see ${OUT_DIR}/${name}.*.log" >&2
    exit 1
  fi
  tail -n 1 "${OUT_DIR}/${name}.out" > "${OUT_DIR}/${name}.json"
  rm -f "${OUT_DIR}/${name}.out"
}

for w in 1 2 4; do
  if ((w > NPROC)); then
    log "tp W=${w}: ${w} ranks of 1 thread on ${NPROC} cores: oversubscribed"
  fi
  run_threads "tp-${w}-threads" "${w}" --tp "${w}"
  if ((w > 1)); then
    run_processes "tp-${w}-processes" "${w}" --mode tp
  fi
done
run_threads "dp-ep-2-threads" 2 --mode dp-ep --ep 2
run_processes "dp-ep-2-processes" 2 --mode dp-ep

# --- the table ----------------------------------------------------------------------------------
python3 - "${OUT_DIR}" "${NPROC}" <<'EOF'
import json
import sys

out_dir, nproc = sys.argv[1], int(sys.argv[2])
names = ["tp-1-threads", "tp-2-threads", "tp-2-processes", "tp-4-threads", "tp-4-processes",
         "dp-ep-2-threads", "dp-ep-2-processes"]
results = [json.load(open(f"{out_dir}/{n}.json")) for n in names]


def spread(values, fmt):
    lo, hi = min(values), max(values)
    mean = sum(values) / len(values)
    if hi - lo <= 0.01 * max(abs(mean), 1e-9):
        return fmt.format(mean)
    return f"{fmt.format(mean)} ({fmt.format(lo)}-{fmt.format(hi)})"


r0 = results[0]
print(f"prompt {r0['prompt_len']} tokens, decode {r0['decode_tokens']} tokens, "
      f"{r0['runs']} runs, {nproc} cores; weight MiB and bytes: mean over ranks "
      f"(min-max when they differ); ms/step: rank 0, median over all timed steps")
print()
print("| mode | W | ranks as | threads/rank | weight MiB per rank | decode ms/step "
      "| decode tokens/s | bytes sent per step per rank | collectives per step |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
for name, r in zip(names, results):
    ranks = r["ranks"]
    as_ = r["ranks_as"] if r["world_size"] > 1 else "-"
    if r["world_size"] > nproc:
        as_ += " (oversubscribed)"
    print(f"| {r['mode']} | {r['world_size']} | {as_} | {r['threads_per_rank']} "
          f"| {spread([x['weight_mib'] for x in ranks], '{:.1f}')} "
          f"| {r['decode_ms_per_step']:.2f} | {r['decode_tok_s']['median']:.2f} "
          f"| {spread([x['bytes_sent_per_step'] for x in ranks], '{:,.0f}')} "
          f"| {spread([x['collectives_per_step'] for x in ranks], '{:.1f}')} |")
EOF
