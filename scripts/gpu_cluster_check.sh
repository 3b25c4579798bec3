#!/usr/bin/env bash
# The cluster on a machine with an NVIDIA GPU but none of our system libraries: unpacks the
# bundle from `scripts/gpu_deps.sh --services` into a private prefix (as scripts/gpu_check.sh
# does), configures with CUDA and the gRPC services into build-gpu-services, builds
# gemma-coordinator, gemma-worker, gemmactl and gemma-generate, then on loopback:
#
#   1. the reference: gemma-generate --backend cpu, greedy, on 8 token-id prompts;
#   2. a gemma-coordinator and one replica `gemma-worker --backend cuda --gpus 1 --kv-dtype
#      f32` of tests/golden/data/tiny-moe; once it is healthy, alone in the cluster: 8 concurrent
#      `gemmactl generate --tokens ...` streams whose ids must equal the reference, 2 text
#      streams, one `gemmactl chat` turn and `gemmactl status`;
#   3. a second replica on the CPU (`--cpu-ranks 2`: tp=2, two rank processes); once the
#      cluster has both (or only this one, when the CUDA replica failed): the same streams,
#      now spread over the replicas, again equal to the reference, a chat turn and the status;
#   4. stops every process (SIGTERM to each server, which stops its own rank processes; SIGKILL
#      to what is left after 20 s, a failure) and checks that none is left;
#   5. when at least CLUSTER_TESTS_MIN_S (240) seconds are left, builds the cluster tests
#      (tests/cluster: coordinator, workers and gemmactl on the CPU, failover included) and runs
#      `ctest -L cluster`; with less time left they are marked skipped, which is no failure.
#
# A CUDA replica that does not start (no GPU, a CUDA error) is a failed step whose log starts
# with the worker's own message; the CPU part still runs. Writes to OUTDIR:
#
#   summary.md     the table of steps (pass / FAIL / TIMEOUT / skipped, seconds), the streams
#                  against the reference, the last status table, the tail of each failed log
#   logs.tar.gz    every log (gpu-cluster-logs/*.log: build, servers, clients, tests)
#
# rewritten after every step, so a run cut short still leaves them; nothing else goes to
# OUTDIR. The run keeps within GPU_CHECK_BUDGET seconds (default 540, for a 10-minute
# command): each step runs under `timeout`, capped by its own limit and by what is left; a
# step with no time left is marked skipped. Exit status 0 only when every step passed.
#
#   scripts/gpu_cluster_check.sh OUTDIR [DEPS_DIR]     # DEPS_DIR default: <repo root>/gpu-deps
#
# Environment: GPU_CHECK_BUDGET, GPU_CHECK_WERROR, GPU_CHECK_JOBS (as gpu_check.sh);
# GPU_CLUSTER_TESTS=0 leaves out step 5.
# shellcheck disable=SC2317  # the functions below run through `bash -c` (export -f) or traps
set -uo pipefail

OUT="${1:?usage: scripts/gpu_cluster_check.sh OUTDIR [DEPS_DIR]}"
GPU_TAG=gpu_cluster_check
GPU_TITLE="GPU cluster check"
GPU_LOGNAME=gpu-cluster-logs
GPU_SERVICES=ON
GPU_NEED_PKGS="libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkgconf-bin"
LDD_SHOW="gemma-worker gemma-coordinator gemmactl"
RESERVE=35  # the summary, the archive and the shutdown (at most STOP_TIMEOUT + a little)
# shellcheck source=scripts/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh"  # ROOT; unpack, configure, check_libs, step, write_summary
# shellcheck source=scripts/process_lib.sh
source "$(dirname "$0")/process_lib.sh"  # proc_table, tracked_pids, alive, start_server
BUILD="${ROOT}/build-gpu-services"
gpu_setup "${OUT}" "${2:-}"

BIN="${BUILD}/bin"
MODEL="${ROOT}/tests/golden/data/tiny-moe"
MAX_TOKENS=16
STOP_TIMEOUT=20  # the worker supervisor's own grace for its ranks is 10 s
CLUSTER_TESTS="${GPU_CLUSTER_TESTS:-1}"
CLUSTER_TESTS_MIN_S=240
WORK="${LOGROOT}/work"  # reference ids (not archived)
mkdir -p "${WORK}"
export BIN MODEL MAX_TOKENS WORK LOGS

# The token-id prompts (those of tests/cluster/replica_test.cc) and the text prompts.
prompt() { local i=$1; echo "2,$((20 + 5 * i)),$((100 + 3 * i)),$((410 - 2 * i)),$((7 + i))"; }
NUM_PROMPTS=8
export NUM_PROMPTS
export -f prompt

# --- steps run through `bash -c` ---------------------------------------------------------------

# The reference ids: gemma-generate on the CPU backend, greedy, stopping at an end id (what the
# cluster tests compare against).
reference() {
  local i rc=0
  for ((i = 0; i < NUM_PROMPTS; i++)); do
    "${BIN}/gemma-generate" --backend cpu --model "${MODEL}" --tokens "$(prompt "${i}")" \
      --max-new-tokens "${MAX_TOKENS}" --stop-at-eos --threads 1 > "${WORK}/ref${i}" 2>"${WORK}/ref${i}.err" ||
      { rc=1; cat "${WORK}/ref${i}.err"; }
    echo "[p${i}] $(prompt "${i}") -> $(cat "${WORK}/ref${i}")"
    [[ -s "${WORK}/ref${i}" ]] || rc=1
  done
  return "${rc}"
}

# wait_serving ADDRESS: until the coordinator answers `gemmactl status`.
wait_serving() {
  until "${BIN}/gemmactl" --coordinator "$1" --connect-timeout-ms 500 status; do sleep 0.3; done
}

# wait_healthy PID LOG WANT: until the coordinator lists WANT healthy replicas, or the worker
# PID (writing LOG) exits: then its last lines, its own message first.
wait_healthy() {
  local pid="$1" log="$2" want="$3" json healthy
  while true; do
    if ! alive "${pid}"; then
      echo "the worker exited during start-up; its message:"
      grep -E '^(gemma-worker: |[EF][0-9]{4} )' "${log}" | head -n 5 | sed 's/^/  /'
      echo "---- last lines of ${log##*/}"
      tail -n 20 "${log}"
      return 1
    fi
    json="$("${BIN}/gemmactl" --connect-timeout-ms 500 status --json 2>/dev/null)"
    healthy="$(grep -o '"healthy":true' <<<"${json}" | wc -l)"
    if (( healthy >= want )); then
      echo "${healthy} healthy replica(s)"
      "${BIN}/gemmactl" status
      return 0
    fi
    sleep 0.5
  done
}

# streams NAME: NUM_PROMPTS concurrent token-id streams and 2 text streams; every token stream
# must equal the reference, every stream must end with its final line.
streams() {
  local name="$1" i rc=0 pids=() got want
  local texts=("In the beginning God created the heaven and the earth." "The LORD is my shepherd;")
  for ((i = 0; i < NUM_PROMPTS; i++)); do
    "${BIN}/gemmactl" generate --tokens "$(prompt "${i}")" --max-tokens "${MAX_TOKENS}" \
      > "${WORK}/${name}_ids${i}.out" 2> "${WORK}/${name}_ids${i}.err" &
    pids+=("$!")
  done
  for i in "${!texts[@]}"; do
    "${BIN}/gemmactl" generate "${texts[$i]}" --max-tokens "${MAX_TOKENS}" \
      > "${WORK}/${name}_text${i}.out" 2> "${WORK}/${name}_text${i}.err" &
    pids+=("$!")
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || { echo "stream ${i}: gemmactl exit $?"; rc=1; }; done
  for ((i = 0; i < NUM_PROMPTS; i++)); do
    got="$(tr -d '\n' < "${WORK}/${name}_ids${i}.out")"
    want="$(tr -d '\n' < "${WORK}/ref${i}")"
    if [[ -n "${got}" && "${got}" == "${want}" ]]; then
      echo "[p${i}] = reference: ${got}  $(tail -n 1 "${WORK}/${name}_ids${i}.err")"
    else
      echo "[p${i}] MISMATCH: got '${got}', reference '${want}'; $(cat "${WORK}/${name}_ids${i}.err")"
      rc=1
    fi
  done
  for i in "${!texts[@]}"; do
    # The random weights make gibberish, control characters included: shown as spaces.
    echo "[text${i}] \"${texts[$i]}\" -> $(tr '\000-\037\177' ' ' < "${WORK}/${name}_text${i}.out" | cut -c1-120)"
    echo "          $(tail -n 1 "${WORK}/${name}_text${i}.err")"
    grep -q '^\[.*generated\]$' "${WORK}/${name}_text${i}.err" || rc=1
  done
  return "${rc}"
}

# chat_turn: one turn of `gemmactl chat` through piped stdin.
chat_turn() {
  local out
  out="$(echo "Who made the heaven and the earth?" |
    "${BIN}/gemmactl" chat --echo --max-tokens "${MAX_TOKENS}" 2>&1)" || { echo "${out}"; return 1; }
  tr '\000-\010\013-\037\177' ' ' <<<"${out}"
  grep -q '^model> ' <<<"${out}" && grep -q '^\[.*generated\]$' <<<"${out}"
}

# status_check WANT: the status table, and WANT healthy replicas in --json.
status_check() {
  local json healthy
  "${BIN}/gemmactl" status || return 1
  json="$("${BIN}/gemmactl" status --json)" || return 1
  echo "${json}"
  healthy="$(grep -o '"healthy":true' <<<"${json}" | wc -l)"
  echo "healthy replicas: ${healthy} (want ${1})"
  (( healthy == $1 ))
}

export -f reference wait_serving proc_table alive wait_healthy streams chat_turn status_check

# --- the servers and their shutdown (in this shell) --------------------------------------------

NAMES=()  # what each started server is
PGIDS=()  # its process group (each runs as the leader of a new session)

# start NAME LOG COMMAND...: a server as the leader of its own session, logging to LOGS/LOG.
start() {
  start_server "$1" "${LOGS}/$2" "${@:3}"
  echo "${GPU_TAG}: started $1 (pid $!)"
}

# SIGTERM to each server (the leader of its process group: a worker's supervisor stops its own
# rank processes, SIGKILL after its 10 s grace), then, after STOP_TIMEOUT seconds, SIGKILL to
# whatever is left in the groups or below them. Returns 1 when SIGKILL was needed.
stop_groups() {
  [[ $# -gt 0 ]] || return 0
  local pids pgid pid deadline
  for pgid in "$@"; do kill -TERM "${pgid}" 2>/dev/null; done
  deadline=$((SECONDS + STOP_TIMEOUT))
  while [[ -n "$(tracked_pids "$@")" ]] && (( SECONDS < deadline )); do
    sleep 0.1
  done
  mapfile -t pids < <(tracked_pids "$@")
  (( ${#pids[@]} == 0 )) && return 0
  echo "still running ${STOP_TIMEOUT} s after SIGTERM, SIGKILL:"
  for pid in "${pids[@]}"; do echo "  ${pid}: $(tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null)"; done
  for pgid in "$@"; do kill -KILL -- "-${pgid}" 2>/dev/null; done
  for pid in "${pids[@]}"; do kill -KILL "${pid}" 2>/dev/null; done
  return 1
}

# Stops the replicas, then the coordinator; says how each ended and whether anything is left.
shutdown_cluster() {
  (( ${#PGIDS[@]} )) || return 0
  local i rc=0 status left
  stop_groups "${PGIDS[@]:1}" || rc=1
  stop_groups "${PGIDS[0]}" || rc=1
  for i in "${!PGIDS[@]}"; do
    wait "${PGIDS[$i]}"
    status=$?
    echo "${NAMES[$i]} (pid ${PGIDS[$i]}): exit status ${status}"
  done
  # A rank that outlived its supervisor's grace period (the supervisor then killed it).
  grep -h 'did not stop; killing it' "${LOGS}"/worker_*.log 2>/dev/null | sed 's/^/note: /'
  mapfile -t left < <(tracked_pids "${PGIDS[@]}")
  if (( ${#left[@]} > 0 )); then
    echo "processes left behind:"
    for i in "${left[@]}"; do echo "  ${i}: $(tr '\0' ' ' < "/proc/${i}/cmdline" 2>/dev/null)"; done
    rc=1
  else
    echo "all processes stopped (process groups ${PGIDS[*]}: none left)"
  fi
  PGIDS=()
  NAMES=()
  return "${rc}"
}

# The shutdown as a step of its own (it needs this shell's PGIDS, so no `timeout`: it is
# bounded by 2 x STOP_TIMEOUT).
shutdown_step() {
  (( ${#PGIDS[@]} )) || return 0
  local start=${SECONDS} rc result
  echo "${GPU_TAG}: shutdown"
  shutdown_cluster > "${LOGS}/shutdown.log" 2>&1
  rc=$?
  result=pass
  grep -q '^note: ' "${LOGS}/shutdown.log" && result="pass (a rank needed its supervisor's SIGKILL)"
  if (( rc != 0 )); then result="FAIL (${rc})"; FAILED=1; FAILED_LOGS+=(shutdown.log); fi
  ROWS+=("| shutdown: every process stopped, none left | ${result} | $((SECONDS - start)) s | shutdown.log |")
  echo "${GPU_TAG}: shutdown: ${result}"
  write_summary
}

on_exit() {
  trap - EXIT INT TERM
  local cut=0
  if [[ -n "${CURRENT_STEP}" ]]; then
    ROWS+=("| ${CURRENT_STEP} | interrupted | | |")
    cut=1
  fi
  if (( ${#PGIDS[@]} )); then
    shutdown_cluster >> "${LOGS}/shutdown.log" 2>&1
    ROWS+=("| shutdown (interrupted run) | done | | shutdown.log |")
    cut=1
  fi
  if (( cut )); then
    FAILED=1
    write_summary
  fi
  rm -rf "${LOGROOT}"
}
trap on_exit EXIT
trap 'echo "${GPU_TAG}: interrupted" >&2; exit 1' INT TERM

free_port() {
  env -u LD_LIBRARY_PATH python3 -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
    2>/dev/null && return
  local port
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then echo "${port}"; return; fi
  done
  return 1
}

# summary.md, after the table of steps: the streams against the reference and the last status.
summary_sections() {
  local log
  for log in streams_cuda.log streams_mixed.log; do
    [[ -f "${LOGS}/${log}" ]] || continue
    echo
    echo "## ${log%.log}"
    echo '```'
    head -n 40 "${LOGS}/${log}"
    echo '```'
  done
  for log in status_mixed.log status_cuda.log; do
    [[ -f "${LOGS}/${log}" ]] || continue
    echo
    echo "## gemmactl status (${log%.log})"
    echo '```'
    grep -v '^{' "${LOGS}/${log}"
    echo '```'
    break
  done
}

# --- the run -------------------------------------------------------------------------------

probe_device
write_summary
TARGETS=(gemma-coordinator gemma-worker gemmactl gemma-generate)
TEST_TARGETS=(cluster_test replica_test gemmactl_test coordinator_test)
BUILT=0
if step "unpack dependencies (with the services)" unpack.log 120 bash -c unpack &&
   step "configure (CUDA, services)" configure.log 180 \
     bash -c 'configure "$@"' configure -DGEMMA_BUILD_TESTS=ON "${NCCL_ARGS[@]}" &&
   step "build ${TARGETS[*]}" build.log 100000 \
     cmake --build "${BUILD}" -j "${JOBS}" --target "${TARGETS[@]}"; then
  BUILT=1
  step "shared libraries (ldd)" ldd.log 60 bash -c check_libs
else
  ROWS+=("| the cluster | not run (no build) | 0 s | |")
fi

if [[ ${BUILT} == 1 ]] && step "reference: gemma-generate --backend cpu" reference.log 120 bash -c reference; then
  PORT="$(free_port)"
  export GEMMA_COORDINATOR="127.0.0.1:${PORT}"
  start coordinator coordinator.log "${BIN}/gemma-coordinator" --listen "${GEMMA_COORDINATOR}" --insecure
  if step "coordinator serving on ${GEMMA_COORDINATOR}" coordinator_up.log 20 \
       bash -c 'wait_serving "$@"' wait_serving "${GEMMA_COORDINATOR}"; then
    WORKER_ARGS=(--coordinator "${GEMMA_COORDINATOR}" --model "${MODEL}")
    # 1. The CUDA replica, alone in the cluster: every request goes to it. Its streams must
    #    equal the CPU reference exactly, so it keeps an f32 KV cache (--kv-dtype f32): the
    #    default bf16 cache's rounding can flip near-tie choices of the tiny random checkpoint
    #    (the gpu tier checks the bf16 cache against the CPU within its bound).
    start "cuda replica" worker_cuda.log "${BIN}/gemma-worker" "${WORKER_ARGS[@]}" \
      --backend cuda --gpus 1 --kv-dtype f32
    CUDA_OK=0
    if step "CUDA replica (--backend cuda --gpus 1) healthy" cuda_replica.log 150 \
         bash -c 'wait_healthy "$@"' wait_healthy "${PGIDS[1]}" "${LOGS}/worker_cuda.log" 1; then
      CUDA_OK=1
      step "CUDA replica: ${NUM_PROMPTS} concurrent token streams = reference, 2 text streams" \
        streams_cuda.log 120 bash -c 'streams cuda'
      step "CUDA replica: gemmactl chat (one turn)" chat_cuda.log 60 bash -c chat_turn
      step "CUDA replica: gemmactl status" status_cuda.log 20 bash -c 'status_check 1'
    fi
    # 2. A CPU replica of two rank processes (tp=2) joins; with the CUDA one the streams spread
    #    over both.
    start "cpu replica" worker_cpu.log "${BIN}/gemma-worker" "${WORKER_ARGS[@]}" \
      --cpu-ranks 2 --threads 1
    WANT=$((1 + CUDA_OK))
    if step "CPU replica (--cpu-ranks 2) healthy: ${WANT} healthy replica(s)" cpu_replica.log 150 \
         bash -c 'wait_healthy "$@"' wait_healthy "${PGIDS[2]}" "${LOGS}/worker_cpu.log" "${WANT}"; then
      step "${WANT} replica(s): ${NUM_PROMPTS} concurrent token streams = reference, 2 text streams" \
        streams_mixed.log 120 bash -c 'streams mixed'
      step "${WANT} replica(s): gemmactl chat (one turn)" chat_mixed.log 60 bash -c chat_turn
      step "${WANT} replica(s): gemmactl status" status_mixed.log 20 bash -c "status_check ${WANT}"
    fi
  fi
  shutdown_step
fi

# 5. The cluster tests, when there is time for them (they run on the CPU: no failure to skip).
if [[ ${BUILT} == 1 && "${CLUSTER_TESTS}" == 1 ]]; then
  LEFT=$(( $(remaining) - RESERVE ))
  if (( LEFT >= CLUSTER_TESTS_MIN_S )); then
    step "build the cluster tests" build_tests.log 150 \
        cmake --build "${BUILD}" -j "${JOBS}" --target "${TEST_TARGETS[@]}" &&
      step "ctest -L cluster (CPU)" ctest_cluster.log 240 \
        ctest --test-dir "${BUILD}" -L cluster --output-on-failure --timeout 120 --no-tests=error
  else
    ROWS+=("| cluster tests (ctest -L cluster) | skipped: ${LEFT} s left, they need ${CLUSTER_TESTS_MIN_S} | 0 s | |")
  fi
fi

write_summary
cat "${SUMMARY}"
exit ${FAILED}
