#!/usr/bin/env bash
# The main job: builds, then runs a small cluster on this machine's CPU and talks to it.
#
#   scripts/demo.sh [--help]
#
# 1. Installs the Debian packages and builds (scripts/build.sh).
# 2. Starts gemma-coordinator on a free 127.0.0.1 port and two replicas of the demo model
#    (models/kjv-moe: a small Gemma 4 MoE trained on the King James Version by
#    scripts/train_demo_model.sh, so its text reads like the KJV): replica A with one CPU
#    rank, replica B with two (tp=2, a supervisor process and two rank processes, the experts
#    split over them).
# 3. Waits until `gemmactl status` shows both healthy, shows the status table, sends several
#    concurrent `gemmactl generate` requests (their streams shown side by side as they arrive)
#    and a two-turn `gemmactl chat` through piped stdin, runs a batch job from an OpenAI batch
#    file (`gemmactl batch submit --wait`, then `batch results`), then shows the status table
#    again.
# 4. Stops everything (SIGTERM to each process group, SIGKILL after a timeout) and checks that
#    no process is left, also when interrupted with Ctrl-C.
#
# Environment:
#   MODEL=DIR             checkpoint directory (default models/kjv-moe); a real one
#                         needs its weights in memory twice (one copy per replica)
#   MAX_TOKENS=N          tokens per request (default 24)
#   THREADS=N             CPU threads per rank (default 1)
#   DEMO_KEEP_LOGS=1      keep the log directory (it is always kept when the demo fails)
#   DEMO_SKIP_BUILD=1     use the binaries already in build/bin
#   DEMO_START_TIMEOUT=S  seconds to wait for the replicas (default 120)
#   DEMO_STOP_TIMEOUT=S   seconds between SIGTERM and SIGKILL (default 10)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/process_lib.sh
source "${ROOT}/scripts/process_lib.sh"  # proc_table, tracked_pids, alive, start_server
cd "${ROOT}"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "demo.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
esac

MODEL="${MODEL:-models/kjv-moe}"
MAX_TOKENS="${MAX_TOKENS:-24}"
THREADS="${THREADS:-1}"
START_TIMEOUT="${DEMO_START_TIMEOUT:-120}"
STOP_TIMEOUT="${DEMO_STOP_TIMEOUT:-10}"
BIN="${ROOT}/build/bin"
PROMPTS=(
  "In the beginning God created the heaven and the earth."
  "And the LORD said unto Moses,"
  "Blessed are the meek: for they"
  "The LORD is my shepherd; I shall not want."
)
CHAT_LINES=(
  "Who made the heaven and the earth?"
  "And what did he say unto Moses?"
)

# --- processes and their shutdown -------------------------------------------------------------

LOG_DIR=""
NAMES=()     # what each started server is, for messages
PGIDS=()     # its process group (the server runs as the leader of a new session)
CLIENTS=()   # background gemmactl pids
FAILED=0
CLEANED=0

log_tails() {
  local name
  for name in "${LOG_DIR}"/*.log; do
    [[ -f "${name}" ]] || continue
    echo "---- last lines of ${name}" >&2
    tail -n 15 "${name}" >&2 || true
  done
}

fail() {
  FAILED=1
  echo >&2
  echo "demo.sh: FAILED: $*" >&2
  [[ -n "${LOG_DIR}" ]] && log_tails
  exit 1
}

# SIGTERM to the process groups (and to anything below them that left its group), then SIGKILL
# after STOP_TIMEOUT seconds.
stop_groups() {
  [[ $# -gt 0 ]] || return 0
  local pids pgid pid deadline
  mapfile -t pids < <(tracked_pids "$@")
  for pgid in "$@"; do kill -TERM -- "-${pgid}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do kill -TERM "${pid}" 2>/dev/null || true; done
  deadline=$((SECONDS + STOP_TIMEOUT))
  while [[ -n "$(tracked_pids "$@" "${pids[@]}")" ]] && (( SECONDS < deadline )); do
    sleep 0.1
  done
  mapfile -t pids < <(tracked_pids "$@" "${pids[@]}")
  if (( ${#pids[@]} > 0 )); then
    echo "demo.sh: still running after ${STOP_TIMEOUT}s, SIGKILL: ${pids[*]}" >&2
    for pgid in "$@"; do kill -KILL -- "-${pgid}" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
  fi
}

cleanup() {
  local status=$?
  (( CLEANED )) && return 0
  CLEANED=1
  trap - EXIT
  trap '' INT TERM  # a second Ctrl-C does not cut the shutdown short (it is bounded anyway)
  set +e
  (( status != 0 && status != 130 )) && FAILED=1
  local pid all=()
  for pid in "${CLIENTS[@]}"; do kill -TERM "${pid}" 2>/dev/null; done
  if (( ${#PGIDS[@]} > 0 )); then
    all=("${PGIDS[@]}")
    echo
    echo "== stopping ${NAMES[*]}"
    # Replicas first (index 1 on), then the coordinator they report to.
    stop_groups "${PGIDS[@]:1}"
    stop_groups "${PGIDS[0]}"
  fi
  wait "${all[@]}" "${CLIENTS[@]}" 2>/dev/null  # reap our children
  local left
  mapfile -t left < <(tracked_pids "${all[@]}" "${CLIENTS[@]}")
  if (( ${#left[@]} > 0 )); then
    echo "demo.sh: processes left behind: ${left[*]}" >&2
    ps -o pid,pgid,args -p "$(IFS=,; echo "${left[*]}")" >&2
    FAILED=1
  elif (( ${#all[@]} > 0 )); then
    echo "all processes stopped (process groups ${all[*]}: none left)"
  fi
  if [[ -n "${LOG_DIR}" ]]; then
    if (( FAILED )) || [[ "${DEMO_KEEP_LOGS:-0}" == 1 ]]; then
      echo "logs kept in ${LOG_DIR}"
    else
      rm -rf "${LOG_DIR}"
    fi
  fi
  (( FAILED && status == 0 )) && status=1
  exit "${status}"
}
on_signal() {
  echo
  echo "demo.sh: interrupted" >&2
  exit 130
}
trap cleanup EXIT
trap on_signal INT TERM

now_ms() {
  local t="${EPOCHREALTIME/[.,]/}"
  echo $((t / 1000))
}
seconds_since() {  # since now_ms $1, as seconds with one decimal
  local ms=$(($(now_ms) - $1))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 40000))
    # Nothing answers there: connecting fails.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then echo "${port}"; return; fi
  done
  fail "no free port found"
}

# --- build -------------------------------------------------------------------------------------

if [[ "${DEMO_SKIP_BUILD:-0}" != 1 ]]; then
  echo "== building (scripts/build.sh)"
  if [[ -f build/CMakeCache.txt ]]; then
    scripts/build.sh  # keep the build tree's settings (tests stay on where they are on)
  else
    scripts/build.sh -DGEMMA_BUILD_TESTS=OFF  # a fresh machine: only what the demo runs
  fi
fi
for tool in gemma-coordinator gemma-worker gemmactl; do
  [[ -x "${BIN}/${tool}" ]] || fail "${BIN}/${tool} is missing; run scripts/build.sh"
done
[[ -f "${MODEL}/config.json" ]] || fail "${MODEL} is not a checkpoint directory (no config.json)"
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gemma-demo.XXXXXX")"
echo "== logs in ${LOG_DIR}"

# --- the cluster ------------------------------------------------------------------------------

PORT="$(free_port)"
export GEMMA_COORDINATOR="127.0.0.1:${PORT}"
echo "== coordinator on ${GEMMA_COORDINATOR} (--insecure: plaintext and no tokens, on loopback for this demo)"
start_server coordinator "${LOG_DIR}/coordinator.log" \
  "${BIN}/gemma-coordinator" --listen "${GEMMA_COORDINATOR}" --data-dir "${LOG_DIR}/data" \
  --insecure  # plaintext, no tokens: this cluster lives on 127.0.0.1 for the demo only
# The workers read the model directory's tokenizer.json (text and chat requests need it).
WORKER_ARGS=(--coordinator "${GEMMA_COORDINATOR}" --model "${MODEL}" --threads "${THREADS}")
echo "== replica A: ${MODEL}, 1 CPU rank"
start_server "replica-A" "${LOG_DIR}/replica-A.log" \
  "${BIN}/gemma-worker" "${WORKER_ARGS[@]}" --cpu-ranks 1
echo "== replica B: ${MODEL}, 2 CPU ranks (tp=2)"
start_server "replica-B" "${LOG_DIR}/replica-B.log" \
  "${BIN}/gemma-worker" "${WORKER_ARGS[@]}" --cpu-ranks 2

printf "waiting for two healthy replicas "
wait_started=$(now_ms)
deadline=$((SECONDS + START_TIMEOUT))
while true; do
  for i in "${!PGIDS[@]}"; do
    alive "${PGIDS[$i]}" || fail "${NAMES[$i]} exited during start-up (log: ${LOG_DIR}/${NAMES[$i]}.log)"
  done
  json="$("${BIN}/gemmactl" --connect-timeout-ms 500 status --json 2>/dev/null || true)"
  healthy="$(grep -o '"healthy":true' <<<"${json}" | wc -l || true)"
  (( healthy >= 2 )) && break
  (( SECONDS < deadline )) ||
    fail "no two healthy replicas after ${START_TIMEOUT}s (healthy: ${healthy}; status: ${json:-no answer})"
  printf "."
  sleep 0.3
done
echo " ok ($(seconds_since "${wait_started}")s)"
for name in replica-A replica-B; do
  address="$(grep -o 'replica serving on [^ ,]*' "${LOG_DIR}/${name}.log" | head -n 1 || true)"
  echo "   ${name}: ${address:-started}"
done
echo
echo "== gemmactl status"
"${BIN}/gemmactl" status

# --- concurrent requests ----------------------------------------------------------------------

echo
echo "== ${#PROMPTS[@]} concurrent requests: gemmactl generate \"...\" --max-tokens ${MAX_TOKENS}"
for i in "${!PROMPTS[@]}"; do
  echo "   [r$((i + 1))] ${PROMPTS[$i]}"
done
started=$(now_ms)
for i in "${!PROMPTS[@]}"; do
  "${BIN}/gemmactl" generate "${PROMPTS[$i]}" --max-tokens "${MAX_TOKENS}" \
    >"${LOG_DIR}/r$((i + 1)).out" 2>"${LOG_DIR}/r$((i + 1)).err" &
  CLIENTS+=("$!")
done

# On a terminal the streams are redrawn in place as they grow; otherwise shown once done.
running() {
  local pid
  for pid in "${CLIENTS[@]}"; do kill -0 "${pid}" 2>/dev/null && return 0; done
  return 1
}
# The text of request $1 so far on one line (control characters, which the random weights
# produce too, as spaces), at most $2 characters: its end.
stream_line() {
  local text
  text="$(tr '\000-\037\177' ' ' <"${LOG_DIR}/r$1.out" 2>/dev/null || true)"
  (( ${#text} > $2 )) && text="…${text: -$(($2 - 1))}"
  printf '%s' "${text}"
}
width=$(( $(tput cols 2>/dev/null || echo 100) - 8 ))
(( width < 20 )) && width=20
if [[ -t 1 ]]; then
  echo
  for i in "${!PROMPTS[@]}"; do echo; done
  while true; do
    running && more=1 || more=0
    printf '\033[%dA' "${#PROMPTS[@]}"
    for i in "${!PROMPTS[@]}"; do
      printf '\r\033[K[r%d] %s\n' "$((i + 1))" "$(stream_line $((i + 1)) "${width}")"
    done
    (( more )) || break
    sleep 0.05
  done
fi
rc=0
for i in "${!CLIENTS[@]}"; do
  wait "${CLIENTS[$i]}" || { rc=$?; echo "[r$((i + 1))] failed (exit ${rc}):" \
    "$(cat "${LOG_DIR}/r$((i + 1)).err")" >&2; }
done
CLIENTS=()
(( rc == 0 )) || fail "a generate request failed"
echo
for i in "${!PROMPTS[@]}"; do
  [[ -t 1 ]] || printf '[r%d] %s\n' "$((i + 1))" "$(stream_line $((i + 1)) 400)"
  printf '[r%d] %s\n' "$((i + 1))" "$(grep -o '^\[.*\]$' "${LOG_DIR}/r$((i + 1)).err" | tail -n 1)"
done
echo "   ${#PROMPTS[@]} requests done in $(seconds_since "${started}")s"

# --- a conversation ---------------------------------------------------------------------------

echo
echo "== gemmactl chat (${#CHAT_LINES[@]} turns through piped stdin; each request carries the"
echo "   conversation so far, so the second prompt is longer)"
# Control characters other than tab and newline are shown as spaces (unbuffered: the reply
# still streams).
printf '%s\n' "${CHAT_LINES[@]}" |
  "${BIN}/gemmactl" chat --echo --max-tokens "${MAX_TOKENS}" 2>&1 |
  stdbuf -o0 tr '\000-\010\013-\037\177' ' ' ||
  fail "gemmactl chat failed"

# --- a batch job ------------------------------------------------------------------------------

BATCH_ITEMS=24
echo
echo "== gemmactl batch submit: ${BATCH_ITEMS} chat completions from an OpenAI batch file, run"
echo "   behind interactive requests and kept in ${LOG_DIR}/data (SQLite)"
for i in $(seq 1 "${BATCH_ITEMS}"); do
  prompt="${PROMPTS[$(( (i - 1) % ${#PROMPTS[@]} ))]}"
  printf '{"custom_id": "verse-%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gemma-4", "messages": [{"role": "user", "content": "%s (%d)"}], "max_tokens": %d, "temperature": 0}}\n' \
    "${i}" "${prompt//\"/\\\"}" "${i}" "${MAX_TOKENS}"
done >"${LOG_DIR}/batch.jsonl"
"${BIN}/gemmactl" batch submit "${LOG_DIR}/batch.jsonl" --wait --json \
  >"${LOG_DIR}/batch.json" || fail "the batch did not complete (see ${LOG_DIR}/batch.json)"
batch_id="$(grep -o '"id":"batch_[^"]*"' "${LOG_DIR}/batch.json" | head -n 1 | cut -d'"' -f4)"
"${BIN}/gemmactl" batch results "${batch_id}" -o "${LOG_DIR}/batch-output.jsonl" ||
  fail "gemmactl batch results failed"
"${BIN}/gemmactl" batch list | head -n 3
echo "   first lines of ${LOG_DIR}/batch-output.jsonl (OpenAI's batch output format):"
head -n 2 "${LOG_DIR}/batch-output.jsonl" | cut -c 1-160 | sed 's/^/   /'

echo
echo "== gemmactl status"
"${BIN}/gemmactl" status
# cleanup (the EXIT trap) stops the cluster and checks that nothing is left.
