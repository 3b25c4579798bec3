#!/usr/bin/env bash
# Prefill and decode tokens/s (one sequence, batch 1) of the C++ CPU engine against Hugging Face
# transformers (torch on the CPU, eager attention and eager experts, float32 both, the same
# thread count), on a random Gemma 4-shaped MoE checkpoint: hidden 1024, 8 layers, 32 experts
# (top 4), vocab 32768.
#
#   scripts/bench_cpu.sh [--threads N] [--prompt-len 128] [--decode-tokens 64] [--runs 5]
#                        [--rounds 1]
#
# Idempotent: creates <repo>/.venv-bench with pinned packages on first use, builds gemma-bench
# in <repo>/build, writes the checkpoint once to <repo>/build/bench-model, then runs both engines
# and prints a markdown table of the medians over --runs runs (min-max in brackets).
# With --rounds R > 1 the two engines run R times each, alternating (ours first in odd rounds,
# transformers first in even ones) so that both see the same load on a shared machine; the table
# then gives the median of the R per-round medians (min-max over all runs) and a second table
# lists every round.
#
# Environment:
#   BENCH_PYTHON=/path/to/python  use this interpreter (which must already have the pinned
#                                 packages) instead of creating .venv-bench
#   BENCH_SKIP_DEPS=1             do not call scripts/setup_deps.sh
#   BENCH_TORCH_INDEX=URL         wheel index to take torch from (e.g. the CPU-only index)
#   BENCH_BUILD_DIR=DIR           build (and keep the checkpoint) in DIR instead of <repo>/build
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BENCH_BUILD_DIR:-${REPO}/build}"
MODEL_DIR="${BUILD}/bench-model"
OUT_DIR="${BUILD}/bench-cpu"
VENV="${REPO}/.venv-bench"

THREADS="$(nproc)"
PROMPT_LEN=128
DECODE_TOKENS=64
RUNS=5
ROUNDS=1

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --threads=*) THREADS="${1#*=}"; shift ;;
    --prompt-len) PROMPT_LEN="$2"; shift 2 ;;
    --prompt-len=*) PROMPT_LEN="${1#*=}"; shift ;;
    --decode-tokens) DECODE_TOKENS="$2"; shift 2 ;;
    --decode-tokens=*) DECODE_TOKENS="${1#*=}"; shift ;;
    --runs) RUNS="$2"; shift 2 ;;
    --runs=*) RUNS="${1#*=}"; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --rounds=*) ROUNDS="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench_cpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in "${THREADS}" "${PROMPT_LEN}" "${DECODE_TOKENS}" "${RUNS}" "${ROUNDS}"; do
  if ! [[ "$v" =~ ^[1-9][0-9]*$ ]]; then
    echo "bench_cpu.sh: --threads, --prompt-len, --decode-tokens, --runs and --rounds take" \
      "positive integers" >&2
    exit 2
  fi
done

log() { echo "[bench_cpu] $*" >&2; }

# --- system packages --------------------------------------------------------------------------
if [[ "${BENCH_SKIP_DEPS:-0}" != "1" && -x "${REPO}/scripts/setup_deps.sh" ]]; then
  log "scripts/setup_deps.sh"
  "${REPO}/scripts/setup_deps.sh" >&2
fi

# --- Python environment -----------------------------------------------------------------------
# Pinned: the versions the numbers in docs/perf.md were measured with.
PINS=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
)
if [[ -n "${BENCH_PYTHON:-}" ]]; then
  PY="${BENCH_PYTHON}"
  log "using ${PY}"
else
  if [[ ! -x "${VENV}/bin/python" ]]; then
    log "creating ${VENV}"
    python3 -m venv "${VENV}"
  fi
  PY="${VENV}/bin/python"
  # No-ops when the pinned versions are already installed.
  if [[ -n "${BENCH_TORCH_INDEX:-}" ]]; then
    "${PY}" -m pip install --quiet --disable-pip-version-check \
      --index-url "${BENCH_TORCH_INDEX}" "${PINS[0]}"
  fi
  "${PY}" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi

# --- gemma-bench and the checkpoint -------------------------------------------------------------
source "${REPO}/scripts/bench_lib.sh"
BENCH_BIN="$(bench_build_target "${BUILD}" gemma-bench)"
bench_ensure_model "${PY}" "${MODEL_DIR}"

# --- the two engines ----------------------------------------------------------------------------
mkdir -p "${OUT_DIR}"
rm -f "${OUT_DIR}"/ours*.json "${OUT_DIR}"/transformers*.json
ARGS=(--prompt-len "${PROMPT_LEN}" --decode-tokens "${DECODE_TOKENS}" --runs "${RUNS}"
      --threads "${THREADS}")
run_ours() {
  log "round $1/${ROUNDS}: gemma-bench ${ARGS[*]}"
  "${BENCH_BIN}" --model "${MODEL_DIR}" "${ARGS[@]}" --json | tail -n 1 > "${OUT_DIR}/ours.$1.json"
}
run_transformers() {
  log "round $1/${ROUNDS}: transformers ${ARGS[*]}"
  "${PY}" "${REPO}/scripts/bench_cpu.py" torch "${MODEL_DIR}" "${ARGS[@]}" 2>/dev/null \
    | tail -n 1 > "${OUT_DIR}/transformers.$1.json"
}
for ((round = 1; round <= ROUNDS; ++round)); do
  if ((round % 2 == 1)); then
    run_ours "${round}"
    run_transformers "${round}"
  else
    run_transformers "${round}"
    run_ours "${round}"
  fi
done

"${PY}" - "${OUT_DIR}" "${ROUNDS}" <<'EOF'
import json
import statistics
import sys

out_dir, rounds = sys.argv[1], int(sys.argv[2])
ours = [json.load(open(f"{out_dir}/ours.{r}.json")) for r in range(1, rounds + 1)]
ref = [json.load(open(f"{out_dir}/transformers.{r}.json")) for r in range(1, rounds + 1)]
KEYS = (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"))


def combined(results, key):
    return {
        "median": statistics.median(r[key]["median"] for r in results),
        "min": min(r[key]["min"] for r in results),
        "max": max(r[key]["max"] for r in results),
    }


def cell(s):
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


r0 = ref[0]
print(f"prompt {ours[0]['prompt_len']} tokens, decode {ours[0]['decode_tokens']} tokens, "
      f"{ours[0]['runs']} runs x {rounds} rounds, {ours[0]['threads']} threads; "
      f"transformers {r0['transformers']}, torch {r0['torch']}, "
      f"attention {r0['attn_implementation']}, experts {r0['experts_implementation']}")
print()
what = "median (min-max)" if rounds == 1 else "median of round medians (min-max of all runs)"
print(f"| metric (batch 1, {what}) | ours | transformers | ratio |")
print("|---|---:|---:|---:|")
for key, name in KEYS:
    a, b = combined(ours, key), combined(ref, key)
    print(f"| {name} | {cell(a)} | {cell(b)} | {a['median'] / b['median']:.2f}x |")
if rounds > 1:
    print()
    print("| round | prefill ours / transformers | decode ours / transformers |")
    print("|---|---:|---:|")
    for r, (a, b) in enumerate(zip(ours, ref), start=1):
        cells = []
        for key, _ in KEYS:
            x, y = a[key]["median"], b[key]["median"]
            cells.append(f"{x:.2f} / {y:.2f} ({x / y:.2f}x)")
        print(f"| {r} | {cells[0]} | {cells[1]} |")
EOF
