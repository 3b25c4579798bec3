#!/usr/bin/env bash
# Starts, stops and shows a gemma cluster on plain machines over ssh: the coordinator on one
# host, one gemma-worker (one replica, all of the host's GPUs) on every host.
#
#   scripts/launch_cluster.sh HOSTS_FILE {start|stop|status} [options]
#
# HOSTS_FILE: one machine a line, `HOST GPUS` (e.g. `10.0.0.5 8`); `#` starts a comment, blank
# lines are ignored. HOST is how ssh, the workers and gemmactl reach the machine (a name or an
# IPv4 address; each worker listens on HOST:0). The first host also runs the coordinator.
#
# start   on the coordinator host: gemma-coordinator --listen 0.0.0.0:PORT
#         --http-listen 0.0.0.0:HTTP_PORT; then on every host gemma-worker --coordinator
#         COORD:PORT --listen HOST:0 --backend cuda --gpus GPUS (--cpu: --backend cpu
#         --cpu-ranks GPUS). Each runs detached (setsid nohup), its log and pid file in
#         --log-dir on its host (coordinator.{log,pid}, worker-HOST.{log,pid}); a process whose
#         pid file names one that runs is not started again. Then waits until
#         `gemmactl status` shows the expected healthy replicas (one per host, or --expect),
#         printing progress, and prints the status and how to send requests. Past --timeout it
#         prints the log tails and exits 1.
# stop    SIGTERM to every worker (they drain), SIGKILL to what is left after --drain-timeout,
#         then the same for the coordinator. Nothing running is not an error.
# status  per host, which processes run (and their pids); then `gemmactl status`.
#
# Options (paths are on the remote hosts unless said otherwise):
#   --coordinator-host H   where the coordinator runs (default: the first host)
#   --port N               the coordinator's gRPC port (default 50051)
#   --http-port N          its HTTP port: OpenAI API and /metrics (default 8000)
#   --models FILE          gemma-coordinator --models: workers get their model from it
#   --model DIR            gemma-worker --model: every worker serves DIR (pinned)
#   --insecure             gemma-coordinator --insecure (serve without TLS or tokens)
#   --tls-cert F --tls-key F   the coordinator's TLS certificate and key
#   --tls-ca F             the CA that verifies the coordinator: gemma-worker --coordinator-ca,
#                          and gemmactl --tls-ca here (the same path on this machine)
#   --auth-tokens F        gemma-coordinator --auth-tokens
#   --join-token-file F    the workers' join token (their $GEMMA_JOIN_TOKEN, the default of
#                          --join-token), read on each host: not on any command line
#   --token-file F         on this machine: the user or admin token gemmactl here sends to
#                          wait for and show the replicas (default: $GEMMA_TOKEN, as gemmactl's
#                          own default; a coordinator with --auth-tokens needs one of them)
#   --cpu                  CPU workers (--backend cpu --cpu-ranks GPUS), for testing
#   --expect N             healthy replicas to wait for (default: the number of hosts)
#   --timeout S            seconds start waits for them (default 600)
#   --drain-timeout S      seconds stop waits for a process after SIGTERM (default 60)
#   --bin DIR              where the binaries are on the hosts (default: this checkout's
#                          build/bin, as an absolute path)
#   --log-dir DIR          logs and pid files on each host (default /tmp/gemma-cluster)
#   --ssh-user U           ssh -l U
#   --ssh-opts "..."       more ssh options, split on spaces (e.g. "-i KEY -p 2222")
#   --coordinator-args "..."  --worker-args "..."   more flags, split on spaces
#   -h, --help             this text
#
# ssh runs with -o BatchMode=yes (keys or an agent, no password prompts). gemmactl runs here:
# $GEMMACTL, else this checkout's build/bin/gemmactl, else the one on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
log() { echo "launch_cluster.sh: $*"; }
die() { echo "launch_cluster.sh: $*" >&2; exit 1; }
usage_error() { echo "launch_cluster.sh: $*" >&2; echo "(--help for usage)" >&2; exit 2; }

# --- the side that runs on each host ------------------------------------------------------------
# These functions are sent over ssh (declare -f) and run there as `r_main ACTION NAME LOG_DIR
# ARGS...`. They use only bash and /proc.
# shellcheck disable=SC2317  # they run on the remote hosts

r_main() {
  set -euo pipefail
  local action="$1" name="$2" dir="$3"
  shift 3
  local pidf="${dir}/${name}.pid" logf="${dir}/${name}.log"
  case "${action}" in
    start) r_start "$@" ;;
    stop) r_stop "$@" ;;
    status)
      local pid
      if pid="$(r_pid)"; then echo "${name}: running (pid ${pid})"; else echo "${name}: not running"; fi
      ;;
    alive) r_pid > /dev/null ;;
    tail)
      if [[ -f "${logf}" ]]; then
        echo "---- $(hostname): last lines of ${logf}"
        tail -n "$1" "${logf}"
      else
        echo "---- $(hostname): no ${logf}"
      fi
      ;;
    *) echo "unknown action ${action}" >&2; return 2 ;;
  esac
}

# The pid in the pid file, when that process runs (not a zombie, and a gemma binary).
r_pid() {
  local pid="" line
  [[ -f "${pidf}" ]] || return 1
  read -r pid < "${pidf}" || true
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  if [[ -r "/proc/${pid}/stat" ]]; then
    read -r line < "/proc/${pid}/stat" || return 1
    [[ "${line##*) }" != Z* ]] || return 1
    local cmd
    cmd="$(tr '\0' ' ' < "/proc/${pid}/cmdline")" || return 1
    [[ "${cmd}" == *gemma-* ]] || return 1
  fi
  echo "${pid}"
}

# Pids alive (zombies excluded) in process group $1 or below pid $1 (rank processes included).
r_tree() {
  local f line st pp pg
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "${f}" || continue
    read -r st pp pg _ <<< "${line##*) }"
    [[ "${st}" == Z ]] && continue
    echo "${line%% *} ${pp} ${pg}"
  done | awk -v root="$1" '
    { pid[NR] = $1; ppid[NR] = $2; if ($3 == root || $1 == root) keep[$1] = 1 }
    END {
      do {
        changed = 0
        for (k in pid) if (!(pid[k] in keep) && (ppid[k] in keep)) { keep[pid[k]] = 1; changed = 1 }
      } while (changed)
      for (p in keep) print p
    }'
}

# Any of the given pids alive (not a zombie)?
r_any_alive() {
  local pid line
  for pid in "$@"; do
    read -r line 2>/dev/null < "/proc/${pid}/stat" || continue
    [[ "${line##*) }" == Z* ]] || return 0
  done
  return 1
}

# r_tree_alive PID PIDS...: any of PIDS, or of the tree of PID now, alive?
r_tree_alive() {
  local now
  mapfile -t now < <(r_tree "$1")
  r_any_alive "$@" "${now[@]}"
}

# r_start TOKEN_FILE COMMAND...: starts COMMAND detached unless it already runs.
r_start() {
  local token_file="$1" pid
  shift
  if pid="$(r_pid)"; then
    echo "${name}: already running (pid ${pid}), not started again"
    return 0
  fi
  mkdir -p "${dir}"
  if [[ ! -x "$1" ]]; then
    echo "${name}: no executable $1 on $(hostname) (--bin)" >&2
    return 1
  fi
  if [[ -n "${token_file}" ]]; then
    if [[ ! -r "${token_file}" ]]; then
      echo "${name}: cannot read the join token file ${token_file} on $(hostname)" >&2
      return 1
    fi
    local token=""
    read -r token < "${token_file}" || true
    export GEMMA_JOIN_TOKEN="${token}"
  fi
  echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) launch_cluster.sh starts: $*" >> "${logf}"
  # Not a process-group leader here (no job control), so setsid runs it in place: $! is its pid,
  # and it leads a new session and process group, its rank processes in it.
  setsid nohup "$@" < /dev/null >> "${logf}" 2>&1 &
  pid=$!
  echo "${pid}" > "${pidf}"
  sleep 1
  if ! r_pid > /dev/null; then
    rm -f "${pidf}"
    echo "${name}: exited at once on $(hostname); last lines of ${logf}:" >&2
    tail -n 20 "${logf}" >&2
    return 1
  fi
  echo "${name}: started (pid ${pid}), log ${logf}"
}

# r_stop TIMEOUT: SIGTERM, then SIGKILL to its whole tree after TIMEOUT seconds.
r_stop() {
  local timeout="$1" pid pids deadline
  if ! pid="$(r_pid)"; then
    rm -f "${pidf}"
    echo "${name}: not running"
    return 0
  fi
  mapfile -t pids < <(r_tree "${pid}")
  kill -TERM "${pid}" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while r_tree_alive "${pid}" "${pids[@]}" && (( SECONDS < deadline )); do
    sleep 0.2
  done
  if r_tree_alive "${pid}" "${pids[@]}"; then
    echo "${name}: still running after ${timeout}s, SIGKILL"
    kill -KILL -- "-${pid}" 2>/dev/null || true
    local p
    for p in "${pid}" "${pids[@]}"; do kill -KILL "${p}" 2>/dev/null || true; done
  fi
  rm -f "${pidf}"
  echo "${name}: stopped (pid ${pid})"
}

REMOTE_FUNCS=(r_main r_pid r_tree r_any_alive r_tree_alive r_start r_stop)

# --- arguments --------------------------------------------------------------------------------

POSITIONAL=()
COORD_HOST=""
PORT=50051
HTTP_PORT=8000
MODELS=""
MODEL=""
INSECURE=0
TLS_CERT=""
TLS_KEY=""
TLS_CA=""
AUTH_TOKENS=""
JOIN_TOKEN_FILE=""
TOKEN_FILE=""
CPU=0
EXPECT=""
TIMEOUT=600
DRAIN_TIMEOUT=60
BIN="${ROOT}/build/bin"
LOG_DIR=/tmp/gemma-cluster
SSH_USER=""
SSH_OPTS=()
COORD_ARGS=()
WORKER_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }
need_number() { [[ "$2" =~ ^[0-9]+$ ]] || usage_error "$1 wants a number, got '$2'"; }

while (( $# > 0 )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --insecure) INSECURE=1; shift; continue ;;
    --cpu) CPU=1; shift; continue ;;
    --*) need_value "$@" ;;
  esac
  case "$1" in
    --coordinator-host) COORD_HOST="$2" ;;
    --port) need_number "$1" "$2"; PORT="$2" ;;
    --http-port) need_number "$1" "$2"; HTTP_PORT="$2" ;;
    --models) MODELS="$2" ;;
    --model) MODEL="$2" ;;
    --tls-cert) TLS_CERT="$2" ;;
    --tls-key) TLS_KEY="$2" ;;
    --tls-ca) TLS_CA="$2" ;;
    --auth-tokens) AUTH_TOKENS="$2" ;;
    --join-token-file) JOIN_TOKEN_FILE="$2" ;;
    --token-file) TOKEN_FILE="$2" ;;
    --expect) need_number "$1" "$2"; EXPECT="$2" ;;
    --timeout) need_number "$1" "$2"; TIMEOUT="$2" ;;
    --drain-timeout) need_number "$1" "$2"; DRAIN_TIMEOUT="$2" ;;
    --bin) BIN="$2" ;;
    --log-dir) LOG_DIR="$2" ;;
    --ssh-user) SSH_USER="$2" ;;
    --ssh-opts) read -r -a SSH_OPTS <<< "$2" ;;
    --coordinator-args) read -r -a COORD_ARGS <<< "$2" ;;
    --worker-args) read -r -a WORKER_ARGS <<< "$2" ;;
    --*) usage_error "unknown option $1" ;;
    *) POSITIONAL+=("$1"); shift; continue ;;
  esac
  shift 2
done

(( ${#POSITIONAL[@]} == 2 )) || usage_error "want HOSTS_FILE and one of start, stop, status"
HOSTS_FILE="${POSITIONAL[0]}"
ACTION="${POSITIONAL[1]}"
case "${ACTION}" in
  start|stop|status) ;;
  *) usage_error "unknown action '${ACTION}' (start, stop or status)" ;;
esac
[[ -r "${HOSTS_FILE}" ]] || usage_error "cannot read the hosts file ${HOSTS_FILE}"
[[ "${LOG_DIR}" == /* ]] || usage_error "--log-dir wants an absolute path, got '${LOG_DIR}'"
[[ -z "${TLS_CERT}" && -z "${TLS_KEY}" ]] || [[ -n "${TLS_CERT}" && -n "${TLS_KEY}" ]] ||
  usage_error "--tls-cert and --tls-key go together"

# --- the hosts file ---------------------------------------------------------------------------

HOSTS=()
GPUS=()
host_re='^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$'
lineno=0
while IFS= read -r raw || [[ -n "${raw}" ]]; do
  lineno=$((lineno + 1))
  line="${raw%%#*}"
  read -r -a fields <<< "${line}" || true
  (( ${#fields[@]} == 0 )) && continue
  if (( ${#fields[@]} != 2 )) || [[ ! "${fields[0]}" =~ ${host_re} ]] ||
     [[ ! "${fields[1]}" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch_cluster.sh: ${HOSTS_FILE}:${lineno}: want 'HOST GPUS' (e.g. '10.0.0.5 8')," \
      "got '${raw}'" >&2
    exit 2
  fi
  for h in "${HOSTS[@]}"; do
    if [[ "${h}" == "${fields[0]}" ]]; then
      echo "launch_cluster.sh: ${HOSTS_FILE}:${lineno}: host ${h} is listed twice" >&2
      exit 2
    fi
  done
  HOSTS+=("${fields[0]}")
  GPUS+=("${fields[1]}")
done < "${HOSTS_FILE}"
(( ${#HOSTS[@]} > 0 )) || { echo "launch_cluster.sh: ${HOSTS_FILE}: no hosts" >&2; exit 2; }
[[ -n "${COORD_HOST}" ]] || COORD_HOST="${HOSTS[0]}"
[[ "${COORD_HOST}" =~ ${host_re} ]] || usage_error "bad --coordinator-host '${COORD_HOST}'"
[[ -n "${EXPECT}" ]] || EXPECT="${#HOSTS[@]}"
COORD="${COORD_HOST}:${PORT}"

GEMMACTL="${GEMMACTL:-${ROOT}/build/bin/gemmactl}"
[[ -x "${GEMMACTL}" ]] || GEMMACTL="$(command -v gemmactl || true)"
CTL=()
if [[ -n "${TOKEN_FILE}" ]]; then
  [[ -r "${TOKEN_FILE}" ]] || usage_error "--token-file ${TOKEN_FILE}: cannot read it (on this machine)"
  GEMMA_TOKEN="$(head -n 1 "${TOKEN_FILE}" | tr -d '[:space:]')"
  export GEMMA_TOKEN  # gemmactl's default token; never on a command line
fi
if [[ -n "${GEMMACTL}" ]]; then
  CTL=("${GEMMACTL}" --coordinator "${COORD}")
  [[ -z "${TLS_CA}" ]] || CTL+=(--tls-ca "${TLS_CA}")
fi

# --- ssh --------------------------------------------------------------------------------------

# on_host HOST ARGS...: runs `r_main ARGS...` on HOST. The functions go over stdin, the
# arguments quoted one by one (printf %q) for the remote shell.
on_host() {
  local host="$1" target="$1"
  shift
  [[ -z "${SSH_USER}" ]] || target="${SSH_USER}@${host}"
  {
    declare -f "${REMOTE_FUNCS[@]}"
    # shellcheck disable=SC2016  # expands on the remote host
    echo 'r_main "$@"'
  } | ssh "${SSH_OPTS[@]}" -o BatchMode=yes -o ConnectTimeout=15 "${target}" \
        "bash -s -- $(printf '%q ' "$@")"
}

worker_name() { echo "worker-$1"; }

# Prints the last lines of every log of the cluster (stderr).
log_tails() {
  on_host "${COORD_HOST}" tail coordinator "${LOG_DIR}" 30 >&2 || true
  local h
  for h in "${HOSTS[@]}"; do
    on_host "${h}" tail "$(worker_name "${h}")" "${LOG_DIR}" 30 >&2 || true
  done
}

ctl_status() {
  if (( ${#CTL[@]} == 0 )); then
    echo "(no gemmactl here: build/bin/gemmactl missing and none on PATH)"
    return 1
  fi
  "${CTL[@]}" status "$@"
}

# Sets HEALTHY to the healthy replicas gemmactl here sees and CTL_ERROR to its error ("" when it
# answered).
healthy_replicas() {
  local json n
  HEALTHY=0
  CTL_ERROR=""
  if ! json="$(ctl_status --json 2> "${CTL_ERR_FILE}")"; then
    CTL_ERROR="$(tail -n 1 "${CTL_ERR_FILE}")"
    return
  fi
  n="$(grep -oE '"healthy": ?true' <<< "${json}" | wc -l)" || true
  HEALTHY=$((n + 0))
}

# --- actions ----------------------------------------------------------------------------------

do_start() {
  local coord_cmd=("${BIN}/gemma-coordinator" --listen "0.0.0.0:${PORT}"
                   --http-listen "0.0.0.0:${HTTP_PORT}")
  [[ -z "${MODELS}" ]] || coord_cmd+=(--models "${MODELS}")
  (( ! INSECURE )) || coord_cmd+=(--insecure)
  [[ -z "${TLS_CERT}" ]] || coord_cmd+=(--tls-cert "${TLS_CERT}" --tls-key "${TLS_KEY}")
  [[ -z "${AUTH_TOKENS}" ]] || coord_cmd+=(--auth-tokens "${AUTH_TOKENS}")
  coord_cmd+=("${COORD_ARGS[@]}")

  log "coordinator on ${COORD_HOST} (${COORD}, HTTP port ${HTTP_PORT})"
  if ! on_host "${COORD_HOST}" start coordinator "${LOG_DIR}" "" "${coord_cmd[@]}"; then
    die "the coordinator did not start on ${COORD_HOST}"
  fi

  local i h cmd failed=0 unit=GPUs
  (( ! CPU )) || unit="CPU ranks"
  for i in "${!HOSTS[@]}"; do
    h="${HOSTS[i]}"
    cmd=("${BIN}/gemma-worker" --coordinator "${COORD}" --listen "${h}:0")
    if (( CPU )); then
      cmd+=(--backend cpu --cpu-ranks "${GPUS[i]}")
    else
      cmd+=(--backend cuda --gpus "${GPUS[i]}")
    fi
    [[ -z "${MODEL}" ]] || cmd+=(--model "${MODEL}")
    [[ -z "${TLS_CA}" ]] || cmd+=(--coordinator-ca "${TLS_CA}")
    cmd+=("${WORKER_ARGS[@]}")
    log "worker on ${h} (${GPUS[i]} ${unit})"
    on_host "${h}" start "$(worker_name "${h}")" "${LOG_DIR}" "${JOIN_TOKEN_FILE}" "${cmd[@]}" ||
      failed=1
  done
  if (( failed )); then
    log_tails
    die "a worker did not start (the others keep running: '$0 ${HOSTS_FILE} stop' stops them)"
  fi

  log "waiting up to ${TIMEOUT}s for ${EXPECT} healthy replicas (gemmactl --coordinator ${COORD})"
  local start=${SECONDS} deadline=$((SECONDS + TIMEOUT)) healthy=0 last=-1 next_print=0
  local next_check=$((SECONDS + 10))
  CTL_ERR_FILE="$(mktemp)"
  trap 'rm -f "${CTL_ERR_FILE}"' EXIT
  while :; do
    healthy_replicas
    healthy=${HEALTHY}
    (( healthy >= EXPECT )) && break
    # A refused token will not start working: say so now rather than after the timeout.
    if [[ "${CTL_ERROR}" == *UNAUTHENTICATED* || "${CTL_ERROR}" == *PERMISSION_DENIED* ]]; then
      echo "launch_cluster.sh: gemmactl here cannot read the cluster's status: ${CTL_ERROR}" >&2
      echo "  give a user or admin token of --auth-tokens with --token-file FILE (on this" >&2
      echo "  machine) or \$GEMMA_TOKEN; the cluster keeps running ('$0 ${HOSTS_FILE} stop' stops it)" >&2
      exit 1
    fi
    if (( healthy != last || SECONDS >= next_print )); then
      log "healthy ${healthy}/${EXPECT} ($((SECONDS - start))s)${CTL_ERROR:+; gemmactl: ${CTL_ERROR#gemmactl: }}"
      last=${healthy}
      next_print=$((SECONDS + 5))
    fi
    if (( SECONDS >= deadline )); then
      echo "launch_cluster.sh: only ${healthy}/${EXPECT} healthy replicas after ${TIMEOUT}s" >&2
      ctl_status >&2 || true
      log_tails
      exit 1
    fi
    if (( SECONDS >= next_check )); then  # a process that died will not come back
      next_check=$((SECONDS + 10))
      local dead=()
      on_host "${COORD_HOST}" alive coordinator "${LOG_DIR}" || dead+=("coordinator on ${COORD_HOST}")
      for h in "${HOSTS[@]}"; do
        on_host "${h}" alive "$(worker_name "${h}")" "${LOG_DIR}" || dead+=("worker on ${h}")
      done
      if (( ${#dead[@]} > 0 )); then
        echo "launch_cluster.sh: exited: ${dead[*]}" >&2
        log_tails
        exit 1
      fi
    fi
    sleep 2
  done
  log "healthy ${healthy}/${EXPECT} ($((SECONDS - start))s)"
  echo
  ctl_status || true
  local scheme=http
  [[ -z "${TLS_CERT}" ]] || scheme=https
  cat <<EOF

The cluster is up. Send work:
  export GEMMA_COORDINATOR=${COORD}
  ${GEMMACTL:-gemmactl} generate "In the beginning" --max-tokens 24
  ${GEMMACTL:-gemmactl} generate --tokens 2,17,301 --max-tokens 8
OpenAI-compatible API: base URL ${scheme}://${COORD_HOST}:${HTTP_PORT}/v1 (/v1/models lists the models)
Stop it: $0 ${HOSTS_FILE} stop
EOF
}

do_stop() {
  local h out status=0 tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064  # tmp is fixed now
  trap "rm -rf '${tmp}'" EXIT
  log "stopping the workers (SIGTERM; they drain for up to ${DRAIN_TIMEOUT}s)"
  local pids=() i
  for i in "${!HOSTS[@]}"; do
    h="${HOSTS[i]}"
    on_host "${h}" stop "$(worker_name "${h}")" "${LOG_DIR}" "${DRAIN_TIMEOUT}" \
      > "${tmp}/${i}" 2>&1 &
    pids+=("$!")
  done
  for i in "${!HOSTS[@]}"; do
    wait "${pids[i]}" || status=1
    while IFS= read -r out; do echo "  ${HOSTS[i]}: ${out}"; done < "${tmp}/${i}"
  done
  log "stopping the coordinator"
  on_host "${COORD_HOST}" stop coordinator "${LOG_DIR}" "${DRAIN_TIMEOUT}" > "${tmp}/c" 2>&1 ||
    status=1
  while IFS= read -r out; do echo "  ${COORD_HOST}: ${out}"; done < "${tmp}/c"
  (( status == 0 )) || die "could not reach every host (see above)"
}

do_status() {
  local h status=0
  on_host "${COORD_HOST}" status coordinator "${LOG_DIR}" | sed "s|^|${COORD_HOST}: |" || status=1
  for h in "${HOSTS[@]}"; do
    on_host "${h}" status "$(worker_name "${h}")" "${LOG_DIR}" | sed "s|^|${h}: |" || status=1
  done
  echo
  ctl_status || echo "(the coordinator ${COORD} does not answer)"
  return "${status}"
}

case "${ACTION}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
