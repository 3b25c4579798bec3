#!/usr/bin/env bash
# Where the time of a decode step and of a long prefill goes, kernel by kernel, on a machine
# with an NVIDIA GPU (the one gpu_check.sh runs on): builds cuda_decode_bench against the
# bundle from scripts/gpu_deps.sh, then runs it under Nsight Compute (ncu) with one metric,
# each kernel's duration, and writes to OUTDIR:
#
#   summary.md            the steps and, per profile, the kernels grouped by name: launches,
#                         total and mean microseconds, share of the profiled time
#   ncu_decode.csv.gz     every kernel of a 26B-A4B-width run at batch 1 (prefill of 128
#                         tokens, warm-up and --steps decode steps), in launch order
#   ncu_prefill.csv.gz    every kernel of one 8192-token prefill at the 26B-A4B widths
#   logs.tar.gz           every log
#
# ncu runs each kernel alone (serialised, clocks left as they are, caches not flushed), so a
# kernel's duration is its own; the gaps between kernels in a real step are not in it. Compare
# the sum of one step's kernels with the step time cuda_decode_bench prints without ncu.
#
#   scripts/gpu_profile.sh OUTDIR [DEPS_DIR]
#
# Environment: GPU_CHECK_BUDGET (seconds, default 540), GPU_PROFILE_LAYERS (default 6).
# shellcheck disable=SC2317
set -uo pipefail

OUT="${1:?usage: scripts/gpu_profile.sh OUTDIR [DEPS_DIR]}"
GPU_TAG=gpu_profile
GPU_TITLE="GPU profile"
GPU_LOGNAME=gpu-profile-logs
GPU_SERVICES=OFF
# shellcheck source=scripts/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh"
BUILD="${ROOT}/build-gpu"
gpu_setup "${OUT}" "${2:-}"
LAYERS="${GPU_PROFILE_LAYERS:-6}"

NCU="$(command -v ncu)"
for n in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
  [[ -z "${NCU}" && -x "${n}" ]] && NCU="${n}"
done
export NCU

# profile NAME ARGS...: cuda_decode_bench ARGS under ncu, its CSV gzipped into OUTDIR.
profile() {
  local name="$1"
  shift
  "${NCU}" --csv --print-units base --metrics gpu__time_duration.sum --clock-control none \
    --cache-control none "${BUILD}/bin/cuda_decode_bench" "$@" > "${LOGS}/ncu_${name}.csv" ||
    return 1
  gzip -c "${LOGS}/ncu_${name}.csv" > "${OUT}/ncu_${name}.csv.gz"
}
export -f profile
export LOGS BUILD

# Kernels grouped by (shortened) name, from an ncu CSV.
table() {
  python3 - "$1" <<'EOF'
import csv, sys, collections
rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        rows.append((r["Kernel Name"].split("(")[0].split("<")[0][-60:], float(r["Metric Value"].replace(",", "")) / 1e3))
total = sum(t for _, t in rows)
agg = collections.defaultdict(lambda: [0, 0.0])
for n, t in rows:
    agg[n][0] += 1; agg[n][1] += t
print(f"{len(rows)} kernels, {total:.1f} us in all\n")
print("| kernel | launches | total us | mean us | share |\n|---|---:|---:|---:|---:|")
for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"| {n} | {c} | {t:.1f} | {t / c:.2f} | {100 * t / total:.1f}% |")
EOF
}

summary_sections() {
  local name
  for name in decode prefill; do
    [[ -s "${LOGS}/ncu_${name}.csv" ]] || continue
    echo
    echo "## ${name}"
    table "${LOGS}/ncu_${name}.csv" 2>&1
  done
}

probe_device
write_summary
if [[ -z "${NCU}" ]]; then
  ROWS+=("| ncu | not found | 0 s | |")
  FAILED=1
elif step "unpack dependencies" unpack.log 120 bash -c unpack &&
     step "configure" configure.log 180 bash -c 'configure "$@"' configure "${NCCL_ARGS[@]}" &&
     step "build cuda_decode_bench" build.log 100000 \
       cmake --build "${BUILD}" -j "${JOBS}" --target cuda_decode_bench; then
  step "cuda_decode_bench, no profiler" decode_plain.log 120 "${BUILD}/bin/cuda_decode_bench" \
    --layers "${LAYERS}" --batch 1 --steps 16 --prompt-len 128
  step "ncu: decode at batch 1" ncu_decode.log 200 bash -c 'profile "$@"' profile decode \
    --layers "${LAYERS}" --batch 1 --steps 2 --prompt-len 128
  step "ncu: 8K-token prefill" ncu_prefill.log 200 bash -c 'profile "$@"' profile prefill \
    --layers "${LAYERS}" --batch 1 --steps 1 --prompt-len 8192
fi
write_summary
cat "${SUMMARY}"
exit "${FAILED}"
