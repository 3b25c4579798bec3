#!/usr/bin/env bash
# The GPU tier on a machine with an NVIDIA GPU but none of our system libraries: unpacks the
# bundle from scripts/gpu_deps.sh into a private prefix, configures and builds with CUDA (no
# services), runs the gpu tests (ctest -L gpu), gemma-generate on CUDA against the CPU, decode
# steps at the 26B-A4B and 31B widths against their floor, an 8K-token prefill, the engine loop
# at 1/8/32 sequences on CUDA, the CUDA kernel benchmarks, then the kernel tests under
# compute-sanitizer, and writes to OUTDIR:
#
#   summary.md     the table of steps (pass / FAIL / TIMEOUT / skipped, seconds), the engine
#                  loop's table on CUDA with its decode rate at 32 sequences over 1, the tests
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
# GPU_CHECK_JOBS (default nproc), GPU_CHECK_SERVICES (1: build the services too, into
# build-gpu-services, for gpu_cluster_check.sh), GPU_CHECK_SANITIZERS (0: leave them out, a
# skip, e.g. for a later call on the same machine), GPU_CHECK_SANITIZERS_TOOLS (default
# "memcheck racecheck initcheck synccheck"), GPU_CHECK_SANITIZERS_FILTER (a gtest filter for the
# sanitizer runs, default all), GPU_CHECK_ENGINE (0: leave the engine loop out, a skip),
# GPU_CHECK_BENCH_MIN_TIME (default 0.2 s a case), GPU_CHECK_FAST_PREFILL (1: the 8K prefill
# again with the tensor-core attention and the device-scheduled experts on).
# shellcheck disable=SC2317  # the functions below run through `bash -c` (export -f)
set -uo pipefail

OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [DEPS_DIR]}"
GPU_TAG=gpu_check
GPU_TITLE="GPU check"
GPU_LOGNAME=gpu-check-logs
# GPU_CHECK_SERVICES=1 builds the gRPC services too, into the folder gpu_cluster_check.sh uses,
# so that one build serves both scripts in one session.
if [[ "${GPU_CHECK_SERVICES:-0}" == 1 ]]; then
  GPU_SERVICES=ON
  GPU_NEED_PKGS="libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkgconf-bin"
else
  GPU_SERVICES=OFF
fi
LDD_SHOW="cuda_ops_test cuda_kernels_bench"
# shellcheck source=scripts/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh"  # ROOT; unpack, configure, check_libs, step, write_summary
BUILD="${ROOT}/build-gpu"
[[ "${GPU_SERVICES}" == ON ]] && BUILD="${ROOT}/build-gpu-services"
gpu_setup "${OUT}" "${2:-}"

# Whole runs through the command-line tool: greedy tokens on the CUDA backend (one rank with
# decode graphs and without, tp = 2 and dp-ep as threads on this GPU) must equal the CPU
# backend's.
# The CUDA runs keep an f32 KV cache (--kv-dtype f32): the comparison is exact, and the default
# bf16 cache rounds every cached key and value (a few 1e-3 of the attention output), which can
# flip the near-tie choices of these tiny random checkpoints; the bf16 cache is checked against
# the CPU by the gpu tier (cuda_ops_test, and cuda_golden_test's serving path).
# Only stdout (the ids) is compared: the CUDA runs also log their device and arena on stderr,
# which goes to a file of its own and is shown when a run fails.
cli_cuda_vs_cpu() {
  local model="${ROOT}/tests/golden/data/tiny-moe" rc=0 args cpu cuda err
  err="$(mktemp)"
  for args in "" "--enforce-eager" "--tp 2" "--mode dp-ep --ep 2" "--mode dp-ep --ep 4 --tp 2"; do
    # shellcheck disable=SC2086  # args holds several flags
    cpu="$("${BUILD}/bin/gemma-generate" --model "${model}" --tokens 2,17,301,45,99,7 \
      --max-new-tokens 16 ${args} 2>"${err}")" || { rc=1; cat "${err}"; }
    # shellcheck disable=SC2086
    cuda="$("${BUILD}/bin/gemma-generate" --model "${model}" --tokens 2,17,301,45,99,7 \
      --max-new-tokens 16 --backend cuda --kv-dtype f32 ${args} 2>"${err}")" ||
      { rc=1; cat "${err}"; }
    echo "[${args:-one rank}] cpu:  ${cpu}"
    echo "[${args:-one rank}] cuda: ${cuda}"
    [[ -n "${cpu}" && "${cpu}" == "${cuda}" ]] || { echo "  MISMATCH"; cat "${err}"; rc=1; }
  done
  rm -f "${err}"
  return "${rc}"
}

export -f cli_cuda_vs_cpu

# Two rank processes on --backend cuda (tp = 2, then dp-ep over 2; an f32 KV cache, as above),
# against the CPU's ids. With one GPU both ranks sit on it and --data-plane auto must fall back
# to Gloo, saying so; with two or more each rank gets its own device and NCCL carries the
# collectives. Either way the log must name the data plane the GPU count calls for.
cli_process_ranks() {
  local model="${ROOT}/tests/golden/data/tiny-moe" rc=0 args cpu cuda want gpus port dir
  local tokens=(--tokens 2,17,301,45,99,7 --max-new-tokens 16)
  local dev0="${CUDA_VISIBLE_DEVICES:-}" dev1="${CUDA_VISIBLE_DEVICES:-}"
  dir="$(mktemp -d)"
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  want="data plane: Gloo"
  if (( gpus >= 2 )); then want="data plane: NCCL"; dev0=0; dev1=1; fi
  for args in "--tp 2" "--mode dp-ep --ep 2"; do
    # shellcheck disable=SC2086  # args holds several flags
    cpu="$("${BUILD}/bin/gemma-generate" --model "${model}" "${tokens[@]}" ${args} \
      2>/dev/null)" || rc=1
    port=$((29600 + RANDOM % 1000))
    # As processes the world is --world-size: drop the thread-layout size flags.
    args="${args/--tp 2/}"
    args="${args/--ep 2/}"
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES="${dev1}" "${BUILD}/bin/gemma-generate" --model "${model}" \
      "${tokens[@]}" --backend cuda --kv-dtype f32 ${args} --world-size 2 --rank 1 \
      --rendezvous "127.0.0.1:${port}" --comm-timeout-s 60 >/dev/null 2>"${dir}/r1.err" &
    # shellcheck disable=SC2086
    cuda="$(CUDA_VISIBLE_DEVICES="${dev0}" "${BUILD}/bin/gemma-generate" --model "${model}" \
      "${tokens[@]}" --backend cuda --kv-dtype f32 ${args} --world-size 2 --rank 0 \
      --rendezvous "127.0.0.1:${port}" --comm-timeout-s 60 2>"${dir}/r0.err")" || rc=1
    wait || rc=1
    echo "[processes ${args:-tp}] cpu:  ${cpu}"
    echo "[processes ${args:-tp}] cuda: ${cuda}"
    grep -h "data plane" "${dir}/r0.err" || true
    [[ -n "${cpu}" && "${cpu}" == "${cuda}" ]] || { echo "  MISMATCH"; rc=1; }
    grep -q "${want}" "${dir}/r0.err" || { echo "  expected '${want}' in rank 0's log"; rc=1; }
    [[ ${rc} == 0 ]] || cat "${dir}/r0.err" "${dir}/r1.err"
  done
  rm -rf "${dir}"
  return "${rc}"
}

export -f cli_process_ranks

# summary.md, after the table of steps: the engine loop's table on CUDA and its throughput
# ratio at 32 sequences against one (docs/perf.md's target: at least 8x).
engine_section() {
  [[ -f "${LOGS}/engine_bench.log" ]] || return 0
  echo
  echo "## gemma-engine-bench --backend cuda"
  echo '```'
  grep -E '^\|' "${LOGS}/engine_bench.log"
  echo '```'
  awk -F'|' '$2 + 0 == 1 { one = $4 + 0 } $2 + 0 == 32 { many = $4 + 0 }
    END { if (one > 0 && many > 0)
            printf "decode tokens/s at 32 sequences / at 1: %.1f / %.1f = %.2fx (target: 8x)\n",
                   many, one, many / one }' "${LOGS}/engine_bench.log"
}

# summary.md, after the engine section: the ctest -L gpu totals and its lists of skipped and
# failed tests.
summary_sections() {
  engine_section
  [[ -f "${LOGS}/ctest_gpu.log" ]] || return 0
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
}

probe_device
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
    ctest --test-dir "${BUILD}" -L gpu -j 4 --output-on-failure --timeout 120 --no-tests=error
  if [[ -x "${BUILD}/bin/gemma-generate" ]]; then
    step "gemma-generate cuda = cpu" cli_cuda_vs_cpu.log 90 bash -c cli_cuda_vs_cpu
    step "gemma-generate, 2 rank processes on cuda = cpu" cli_process_ranks.log 90 \
      bash -c cli_process_ranks
  fi
  if [[ -x "${BUILD}/bin/cuda_decode_bench" ]]; then
    step "cuda_decode_bench (26B-A4B widths)" decode_bench.log 150 \
      "${BUILD}/bin/cuda_decode_bench" --layers 6 --batch 1,8,32 --steps 64 --prompt-len 128 --json
    step "cuda_decode_bench (31B widths)" decode_bench_31b.log 150 \
      "${BUILD}/bin/cuda_decode_bench" --model 31b --layers 6 --batch 1,8 --steps 32 \
      --prompt-len 128 --json
    # Prefill of one 8K-token prompt (the "prefill step" line), a few decode steps after it.
    step "cuda_decode_bench (26B-A4B, 8K-token prefill)" prefill_bench.log 150 \
      "${BUILD}/bin/cuda_decode_bench" --layers 6 --batch 1 --steps 8 --prompt-len 8192 --json
    # The same prefill with the kernels that are off by default, beside it (opt in: another
    # checkpoint write and 150 s of the budget).
    if [[ "${GPU_CHECK_FAST_PREFILL:-0}" == 1 ]]; then
      step "cuda_decode_bench (26B-A4B, 8K-token prefill, fast paths on)" prefill_fast.log 150 \
        "${BUILD}/bin/cuda_decode_bench" --layers 6 --batch 1 --steps 8 --prompt-len 8192 \
        --tensor-core-attention --device-scheduled-experts --json
    fi
  fi
  if [[ "${GPU_CHECK_ENGINE:-1}" == 0 ]]; then
    ROWS+=("| gemma-engine-bench --backend cuda | skipped (GPU_CHECK_ENGINE=0) | 0 s | |")
  elif [[ -x "${BUILD}/bin/gemma-engine-bench" ]]; then
    # The unpacked Debian libraries stay away from Python's torch.
    step "make-model (engine benchmark model)" make_model.log 90 env -u LD_LIBRARY_PATH \
        python3 "${ROOT}/scripts/bench_cpu.py" make-model "${BUILD}/engine-bench-model" &&
      step "gemma-engine-bench --backend cuda" engine_bench.log 120 \
        "${BUILD}/bin/gemma-engine-bench" --backend cuda --model "${BUILD}/engine-bench-model" \
        --concurrency 1,8,32 --prompt-len 64 --decode-tokens 64
  fi
  if [[ -x "${BUILD}/bin/cuda_kernels_bench" ]]; then
    step "cuda_kernels_bench" bench.log 120 "${BUILD}/bin/cuda_kernels_bench" \
      --benchmark_out="${LOGS}/bench.json" --benchmark_out_format=json \
      --benchmark_min_time="${GPU_CHECK_BENCH_MIN_TIME:-0.2}"
    [[ -s "${LOGS}/bench.json" ]] && cp "${LOGS}/bench.json" "${OUT}/bench.json"
  fi
  SAN="$(command -v compute-sanitizer)"
  for s in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -z "${SAN}" && -x "${s}" ]] && SAN="${s}"
  done
  if [[ "${GPU_CHECK_SANITIZERS:-1}" == 0 ]]; then
    ROWS+=("| compute-sanitizer | skipped (GPU_CHECK_SANITIZERS=0) | 0 s | |")
  elif [[ -n "${SAN}" ]]; then
    # The tensor-core attention tests (CPU references of seconds each) get steps of their own,
    # so that the other op tests still fit each tool's limit.
    for tool in ${GPU_CHECK_SANITIZERS_TOOLS:-memcheck racecheck initcheck synccheck}; do
      step "compute-sanitizer ${tool} cuda_ops_test" "sanitizer_${tool}.log" 120 \
        "${SAN}" --tool "${tool}" --error-exitcode 1 "${BUILD}/bin/cuda_ops_test" \
        --gtest_filter="${GPU_CHECK_SANITIZERS_FILTER:-*:-CudaTensorCoreAttentionTest.*}"
    done
    if [[ -z "${GPU_CHECK_SANITIZERS_FILTER:-}" ]]; then
      for tool in memcheck racecheck; do
        step "compute-sanitizer ${tool} tensor-core attention" "sanitizer_tc_${tool}.log" 120 \
          "${SAN}" --tool "${tool}" --error-exitcode 1 "${BUILD}/bin/cuda_ops_test" \
          --gtest_filter='CudaTensorCoreAttentionTest.*'
      done
    fi
  else
    ROWS+=("| compute-sanitizer | skipped (not found) | 0 s | |")
  fi
fi

write_summary
cat "${SUMMARY}"
exit ${FAILED}
