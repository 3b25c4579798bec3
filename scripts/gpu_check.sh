#!/usr/bin/env bash
# The GPU tier on a machine with an NVIDIA GPU: unpacks the bundle from scripts/gpu_deps.sh into
# a private prefix, configures and builds with CUDA, runs the gpu tests (ctest -L gpu), the
# kernel tests again under compute-sanitizer, and the CUDA benchmarks, then writes a summary
# table and every log to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [DEPS_DIR]     # DEPS_DIR default: gpu-deps
set -uo pipefail

OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [DEPS_DIR]}"
DEPS="${2:-gpu-deps}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${OUT}"
OUT="$(cd "${OUT}" && pwd)"
PREFIX="${ROOT}/build-gpu-prefix"
BUILD="${ROOT}/build-gpu"
SUMMARY="${OUT}/summary.md"
: > "${SUMMARY}"

declare -a ROWS=()
step() {  # step NAME LOG COMMAND...: runs, records pass/fail and seconds
  local name="$1" log="$2"
  shift 2
  local start=$SECONDS
  "$@" > "${OUT}/${log}" 2>&1
  local rc=$?
  ROWS+=("| ${name} | $([[ ${rc} == 0 ]] && echo pass || echo "FAIL (${rc})") | $((SECONDS - start)) s | ${log} |")
  return ${rc}
}

unpack() {
  [[ -d "${DEPS}" ]] || { echo "no dependency bundle at ${DEPS} (run scripts/gpu_deps.sh)"; return 1; }
  mkdir -p "${PREFIX}"
  for deb in "${DEPS}"/*.deb; do dpkg -x "${deb}" "${PREFIX}" || return 1; done
}

LIBDIR="${PREFIX}/usr/lib/x86_64-linux-gnu"
export LD_LIBRARY_PATH="${LIBDIR}:${LIBDIR}/openblas-pthread:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:${PATH}"

configure() {
  cmake -S "${ROOT}" -B "${BUILD}" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGEMMA_ENABLE_CUDA=ON -DGEMMA_BUILD_SERVICES=OFF \
    -DCMAKE_PREFIX_PATH="${PREFIX}/usr;${LIBDIR}/cmake" \
    -DCMAKE_LIBRARY_PATH="${LIBDIR};${LIBDIR}/openblas-pthread" \
    -DCMAKE_INCLUDE_PATH="${PREFIX}/usr/include;${PREFIX}/usr/include/x86_64-linux-gnu/openblas-pthread"
}

nvidia-smi > "${OUT}/nvidia-smi.log" 2>&1
step "unpack dependencies" unpack.log unpack &&
  step "configure" configure.log configure &&
  step "build" build.log cmake --build "${BUILD}" -j "$(nproc)"
if [[ -x "${BUILD}/bin/cuda_ops_test" ]]; then
  step "ctest -L gpu" ctest_gpu.log ctest --test-dir "${BUILD}" -L gpu --output-on-failure
  SAN=/usr/local/cuda/bin/compute-sanitizer
  if [[ -x "${SAN}" ]]; then
    for tool in memcheck racecheck initcheck synccheck; do
      step "compute-sanitizer ${tool} cuda_ops_test" "sanitizer_${tool}.log" \
        "${SAN}" --tool "${tool}" --error-exitcode 1 "${BUILD}/bin/cuda_ops_test"
    done
  fi
  if [[ -x "${BUILD}/bin/cuda_kernels_bench" ]]; then
    step "cuda_kernels_bench" bench.log "${BUILD}/bin/cuda_kernels_bench" \
      --benchmark_out="${OUT}/bench.json" --benchmark_out_format=json
  fi
  grep -h "SKIPPED\|Skipped" "${OUT}/ctest_gpu.log" > "${OUT}/skipped.log" 2>/dev/null
fi

{
  echo "# GPU check $(date -u +%FT%TZ)"
  echo
  echo "Device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} > "${SUMMARY}"
cat "${SUMMARY}"
grep -q "FAIL" "${SUMMARY}" && exit 1
exit 0
