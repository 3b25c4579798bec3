#!/usr/bin/env bash
# The GPU tier on a machine with an NVIDIA GPU but none of our system libraries: unpacks the
# bundle from scripts/gpu_deps.sh into a private prefix, configures and builds with CUDA (no
# services), runs the gpu tests (ctest -L gpu), the CUDA kernel benchmarks, gemma-generate on
# CUDA against the CPU, a decode step at the 26B-A4B widths against its floor, the engine loop
# at 1/8/32 sequences on CUDA, then the kernel tests under compute-sanitizer, and writes to
# OUTDIR:
#
#   summary.md     the table of steps (pass / FAIL / TIMEOUT / skipped, seconds), the tests
#                  skipped and failed, and the tail of each failed step's log
#   logs.tar.gz    every log (gpu-check-logs/*.log)
#   bench.json     the benchmark results, when the benchmark ran
#
# summary.md and logs.tar.gz are rewritten after every step, so a run cut short still leaves
# them; nothing else is written under OUTDIR (the logs sit in a temporary folder). The whole run
# keeps within GPU_CHECK_BUDGET seconds (default 540, for a 10-minute command): each step runs
# under `timeout`, capped by its own limit and by what is left of the budget; a step with no
# time left is marked skipped.
#
#   scripts/gpu_check.sh OUTDIR [DEPS_DIR]     # DEPS_DIR default: <repo root>/gpu-deps
#
# Environment: GPU_CHECK_BUDGET (seconds, default 540), GPU_CHECK_WERROR (default OFF: the
# GPU machine's compiler may be newer than ours, and a new warning should not cost the run),
# GPU_CHECK_JOBS (default nproc).
# shellcheck disable=SC2317  # the functions below run through `bash -c` (export -f)
set -uo pipefail

START=${SECONDS}
BUDGET="${GPU_CHECK_BUDGET:-540}"
RESERVE=15  # seconds kept back for the summary and the log archive

OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [DEPS_DIR]}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEPS="${2:-${ROOT}/gpu-deps}"
[[ -d "${DEPS}" ]] && DEPS="$(cd "${DEPS}" && pwd)"
mkdir -p "${OUT}"
OUT="$(cd "${OUT}" && pwd)"
PREFIX="${ROOT}/build-gpu-prefix"
BUILD="${ROOT}/build-gpu"
LIBDIR="${PREFIX}/usr/lib/x86_64-linux-gnu"
JOBS="${GPU_CHECK_JOBS:-$(nproc)}"
SUMMARY="${OUT}/summary.md"

# Logs are written outside OUTDIR and archived into OUTDIR/logs.tar.gz after each step, so that
# OUTDIR holds a few plain files only.
LOGROOT="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
LOGS="${LOGROOT}/gpu-check-logs"
mkdir -p "${LOGS}"
trap 'rm -rf "${LOGROOT}"' EXIT

export PATH="/usr/local/cuda/bin:${PATH}"
# ninja may come from Python's ninja package only.
if ! command -v ninja >/dev/null; then
  NINJA_DIR="$(python3 -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)" &&
    [[ -x "${NINJA_DIR}/ninja" ]] && export PATH="${PATH}:${NINJA_DIR}"
fi
GENERATOR="$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')"

# The bundle's libraries first; the OpenBLAS variant lives in its own folder.
export LD_LIBRARY_PATH="${LIBDIR}:${LIBDIR}/openblas-pthread:${PREFIX}/usr/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"

# NCCL: the toolkit's copy when it has one (the top-level CMakeLists finds it); else the one
# in Python's nvidia-nccl wheel, which has libnccl.so.2 but no libnccl.so, so pass both paths.
NCCL_ARGS=()
NCCL_NOTE="CUDA toolkit"
nccl_in_toolkit() {
  local inc lib
  for inc in /usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include /usr/include; do
    [[ -e "${inc}/nccl.h" ]] || continue
    for lib in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
               /usr/lib/x86_64-linux-gnu; do
      [[ -e "${lib}/libnccl.so" ]] && return 0
    done
  done
  return 1
}
if ! nccl_in_toolkit; then
  NCCL_DIR="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)"
  if [[ -n "${NCCL_DIR}" && -e "${NCCL_DIR}/include/nccl.h" && -e "${NCCL_DIR}/lib/libnccl.so.2" ]]; then
    NCCL_ARGS=(-DGEMMA_NCCL_INCLUDE_DIR="${NCCL_DIR}/include"
               -DGEMMA_NCCL_LIBRARY="${NCCL_DIR}/lib/libnccl.so.2")
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH}:${NCCL_DIR}/lib"
    NCCL_NOTE="${NCCL_DIR} (Python wheel)"
  else
    NCCL_NOTE="not found"
  fi
fi

export ROOT DEPS PREFIX BUILD LIBDIR GENERATOR

unpack() {
  [[ -d "${DEPS}" ]] || { echo "no dependency bundle at ${DEPS} (run scripts/gpu_deps.sh)"; return 1; }
  shopt -s nullglob
  local debs=("${DEPS}"/*.deb)
  (( ${#debs[@]} )) || { echo "no .deb files in ${DEPS}"; return 1; }
  rm -rf "${PREFIX:?}"
  mkdir -p "${PREFIX}"
  local deb
  for deb in "${debs[@]}"; do
    echo "dpkg -x ${deb##*/}"
    dpkg -x "${deb}" "${PREFIX}" || return 1
  done
  # Some Debian 12 packages (libnl-3-200) still install into /lib: merge it into /usr/lib, as
  # a merged-/usr system has it, so that one library folder holds everything.
  if [[ -d "${PREFIX}/lib" ]]; then
    cp -a "${PREFIX}/lib/." "${PREFIX}/usr/lib/" && rm -rf "${PREFIX:?}/lib" || return 1
  fi
  # A few CMake files name absolute /usr paths that the relative import prefix does not cover
  # (Gloo's IMPORTED_LOCATION "/usr/lib/libgloo.so.0.5.0", glog's module path
  # "/usr/share/glog/cmake" for FindUnwind): point every such /usr at the prefix.
  find "${PREFIX}" \( -name '*.cmake' -o -name '*.pc' \) -type f -print0 |
    xargs -0 -r sed -i -E "s#([\"( ;=])/usr([/\"); ]|\$)#\\1${PREFIX}/usr\\2#g" || return 1
  echo "unpacked ${#debs[@]} packages into ${PREFIX} ($(du -sh "${PREFIX}" | cut -f1))"
}

configure() {
  # A build folder from another generator cannot be reused.
  if [[ -f "${BUILD}/CMakeCache.txt" ]] &&
     ! grep -qx "CMAKE_GENERATOR:INTERNAL=${GENERATOR}" "${BUILD}/CMakeCache.txt"; then
    rm -rf "${BUILD}"
  fi
  cmake -S "${ROOT}" -B "${BUILD}" -G "${GENERATOR}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGEMMA_ENABLE_CUDA=ON -DGEMMA_BUILD_SERVICES=OFF \
    -DGEMMA_WERROR="${GPU_CHECK_WERROR:-OFF}" \
    -DCMAKE_PREFIX_PATH="${PREFIX}/usr" \
    -DCMAKE_LIBRARY_PATH="${LIBDIR};${LIBDIR}/openblas-pthread" \
    -DCMAKE_INCLUDE_PATH="${PREFIX}/usr/include;${PREFIX}/usr/include/x86_64-linux-gnu/openblas-pthread" \
    "$@"
}

# Every executable starts its dynamic loader's search without "not found", and prints where
# the bundle's libraries came from.
check_libs() {
  local bad=0 bin
  for bin in "${BUILD}"/bin/*; do
    [[ -x "${bin}" && -f "${bin}" ]] || continue
    if ldd "${bin}" | grep -q 'not found'; then
      echo "${bin##*/}: missing libraries:"; ldd "${bin}" | grep 'not found'; bad=1
    fi
  done
  for bin in cuda_ops_test cuda_kernels_bench; do
    [[ -x "${BUILD}/bin/${bin}" ]] && { echo "== ldd ${bin}"; ldd "${BUILD}/bin/${bin}"; }
  done
  return "${bad}"
}
# Whole runs through the command-line tool: greedy tokens on the CUDA backend (one rank, tp = 2
# and dp-ep as threads on this GPU) must equal the CPU backend's.
cli_cuda_vs_cpu() {
  local model="${ROOT}/tests/golden/data/tiny-moe" rc=0 args cpu cuda
  for args in "" "--tp 2" "--mode dp-ep --ep 2" "--mode dp-ep --ep 4 --tp 2"; do
    # shellcheck disable=SC2086  # args holds several flags
    cpu="$("${BUILD}/bin/gemma-generate" --model "${model}" --tokens 2,17,301,45,99,7 \
      --max-new-tokens 16 ${args} 2>&1)" || rc=1
    # shellcheck disable=SC2086
    cuda="$("${BUILD}/bin/gemma-generate" --model "${model}" --tokens 2,17,301,45,99,7 \
      --max-new-tokens 16 --backend cuda ${args} 2>&1)" || rc=1
    echo "[${args:-one rank}] cpu:  ${cpu}"
    echo "[${args:-one rank}] cuda: ${cuda}"
    [[ "${cpu}" == "${cuda}" ]] || { echo "  MISMATCH"; rc=1; }
  done
  return "${rc}"
}

export -f unpack configure check_libs cli_cuda_vs_cpu

declare -a ROWS=()
FAILED=0

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

write_summary() {
  local log
  {
    echo "# GPU check $(date -u +%FT%TZ)"
    echo
    echo "- device: ${DEVICE}"
    echo "- compilers: $(c++ --version 2>/dev/null | head -1); $(nvcc --version 2>/dev/null | tail -1)"
    echo "- cmake: $(cmake --version 2>/dev/null | head -1), generator ${GENERATOR}, -j ${JOBS}"
    echo "- NCCL: ${NCCL_NOTE}"
    echo "- elapsed: $((SECONDS - START)) s of a ${BUDGET} s budget"
    echo
    echo "| step | result | time | log (in logs.tar.gz) |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [[ -f "${LOGS}/ctest_gpu.log" ]]; then
      echo
      echo "## ctest -L gpu"
      echo '```'
      grep -E 'tests passed|tests failed|Total Test time' "${LOGS}/ctest_gpu.log"
      echo "skipped: $(grep -cE '^[0-9 /]+Test +#[0-9]+: .*\*\*\*Skipped' "${LOGS}/ctest_gpu.log")"
      # The closing lists ("did not run" = skipped, "FAILED"), without gtest's GetParam dumps.
      sed -n '/^The following tests /,$p' "${LOGS}/ctest_gpu.log" |
        grep -vE '^(Errors while running CTest|Output from these tests)' |
        sed -E 's/  # GetParam\(\) = .*( \([A-Za-z ]+\))$/\1/' | head -80
      echo '```'
    fi
    for log in "${FAILED_LOGS[@]}"; do
      echo
      echo "## tail of ${log}"
      echo '```'
      tail -n 30 "${LOGS}/${log}"
      echo '```'
    done
  } > "${SUMMARY}.tmp" && mv "${SUMMARY}.tmp" "${SUMMARY}"
  tar -C "${LOGROOT}" -czf "${OUT}/logs.tar.gz.tmp" gpu-check-logs &&
    mv "${OUT}/logs.tar.gz.tmp" "${OUT}/logs.tar.gz"
}
declare -a FAILED_LOGS=()

# step NAME LOG LIMIT COMMAND...: runs COMMAND under timeout (LIMIT seconds, or what is left of
# the budget), records the result, and rewrites the summary.
step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local left=$(( $(remaining) - RESERVE ))
  if (( left < 10 )); then
    ROWS+=("| ${name} | skipped (time budget spent) | 0 s | |")
    FAILED=1
    write_summary
    return 125
  fi
  (( limit > left )) && limit=${left}
  local start=${SECONDS}
  echo "gpu_check: ${name} (limit ${limit} s)"
  timeout -k 10 "${limit}" "$@" > "${LOGS}/${log}" 2>&1
  local rc=$? result
  case ${rc} in
    0) result=pass ;;
    124|137) result="TIMEOUT (${limit} s)" ;;
    *) result="FAIL (${rc})" ;;
  esac
  if (( rc != 0 )); then FAILED=1; FAILED_LOGS+=("${log}"); fi
  ROWS+=("| ${name} | ${result} | $((SECONDS - start)) s | ${log} |")
  echo "gpu_check: ${name}: ${result}"
  write_summary
  return "${rc}"
}

timeout 30 nvidia-smi > "${LOGS}/nvidia-smi.log" 2>&1
DEVICE="$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
write_summary
BUILT=0
if step "unpack dependencies" unpack.log 120 bash -c unpack &&
   step "configure" configure.log 180 bash -c 'configure "$@"' configure "${NCCL_ARGS[@]}" &&
   step "build" build.log 100000 cmake --build "${BUILD}" -j "${JOBS}"; then
  BUILT=1
  step "shared libraries (ldd)" ldd.log 60 bash -c check_libs
else
  ROWS+=("| tests, benchmarks, compute-sanitizer | not run (no build) | 0 s | |")
fi
if [[ ${BUILT} == 1 && -x "${BUILD}/bin/cuda_ops_test" ]]; then
  step "ctest -L gpu" ctest_gpu.log 300 \
    ctest --test-dir "${BUILD}" -L gpu --output-on-failure --timeout 120 --no-tests=error
  if [[ -x "${BUILD}/bin/cuda_kernels_bench" ]]; then
    step "cuda_kernels_bench" bench.log 120 "${BUILD}/bin/cuda_kernels_bench" \
      --benchmark_out="${LOGS}/bench.json" --benchmark_out_format=json --benchmark_min_time=0.2
    [[ -s "${LOGS}/bench.json" ]] && cp "${LOGS}/bench.json" "${OUT}/bench.json"
  fi
  if [[ -x "${BUILD}/bin/gemma-generate" ]]; then
    step "gemma-generate cuda = cpu" cli_cuda_vs_cpu.log 90 bash -c cli_cuda_vs_cpu
  fi
  if [[ -x "${BUILD}/bin/cuda_decode_bench" ]]; then
    step "cuda_decode_bench (26B-A4B widths)" decode_bench.log 150 \
      "${BUILD}/bin/cuda_decode_bench" --layers 6 --batch 1,8,32 --steps 64 --prompt-len 128 --json
  fi
  if [[ -x "${BUILD}/bin/gemma-engine-bench" ]]; then
    # The unpacked Debian libraries stay away from Python's torch.
    step "make-model (engine benchmark model)" make_model.log 90 env -u LD_LIBRARY_PATH \
        python3 "${ROOT}/scripts/bench_cpu.py" make-model "${BUILD}/engine-bench-model" &&
      step "gemma-engine-bench --backend cuda" engine_bench.log 120 \
        "${BUILD}/bin/gemma-engine-bench" --backend cuda --model "${BUILD}/engine-bench-model" \
        --concurrency 1,8,32 --prompt-len 64 --decode-tokens 64
  fi
  SAN="$(command -v compute-sanitizer)"
  for s in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -z "${SAN}" && -x "${s}" ]] && SAN="${s}"
  done
  if [[ -n "${SAN}" ]]; then
    for tool in memcheck racecheck initcheck synccheck; do
      step "compute-sanitizer ${tool} cuda_ops_test" "sanitizer_${tool}.log" 120 \
        "${SAN}" --tool "${tool}" --error-exitcode 1 "${BUILD}/bin/cuda_ops_test"
    done
  else
    ROWS+=("| compute-sanitizer | skipped (not found) | 0 s | |")
  fi
fi

write_summary
cat "${SUMMARY}"
exit ${FAILED}
