#!/usr/bin/env bash
# scripts/launch_cluster.sh over real ssh: two "machines" are two network namespaces, each with
# its own sshd, on a bridge in this namespace (they share the file system, so --bin and --model
# are this checkout's). Starts a CPU cluster (coordinator and a worker on the first, a worker on
# the second), sends a request from here, checks that a second start starts nothing, that one
# waiting for more replicas than there are times out with the logs, that status lists both
# hosts, that stop leaves no gemma process, that a second stop is quiet and that a coordinator
# started open without --insecure is reported at once.
#
#   tests/deploy/launch_cluster_test.sh [BIN_DIR]   (default: build/bin of this checkout)
#
# Needs root, `ip netns` and /usr/sbin/sshd (openssh-server); otherwise it skips (exit 77).
# Everything it makes (namespaces, bridge, sshd, temporary directory) goes in its EXIT trap
# (LAUNCH_TEST_KEEP=1 keeps the directory: the script's output and the logs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$(cd "${1:-${ROOT}/build/bin}" && pwd)"
MODEL="${ROOT}/tests/golden/data/tiny-moe"
LAUNCH="${ROOT}/scripts/launch_cluster.sh"

say() { echo "launch_cluster_test: $*"; }
skip() { say "SKIP: $*"; exit 77; }

(( EUID == 0 )) || skip "needs root (network namespaces, sshd)"
[[ -x /usr/sbin/sshd ]] || skip "no /usr/sbin/sshd (apt-get install openssh-server)"
for tool in ip ssh ssh-keygen; do
  command -v "${tool}" > /dev/null || skip "no ${tool}"
done
for b in gemma-coordinator gemma-worker gemmactl; do
  [[ -x "${BIN}/${b}" ]] || { say "FAIL: no ${BIN}/${b} (build first)"; exit 1; }
done

# Unique names (interface names are at most 15 characters) and a free 10.78.N.0/24.
ID=$$
NS=("lc${ID}a" "lc${ID}b")
VETH_HOST=("lc${ID}ha" "lc${ID}hb")
VETH_NS=("lc${ID}na" "lc${ID}nb")
BR="lcbr${ID}"
NET=$((ID % 200 + 20))
while ip -4 -o addr show | grep -q " 10\.78\.${NET}\." ||
      ip -4 route show | grep -q "^10\.78\.${NET}\."; do
  NET=$(((NET + 1) % 250 + 1))
done
ADDR=("10.78.${NET}.2" "10.78.${NET}.3")
PORT=50051

WORK=""
SSHD_PIDS=()
MADE_NS=()
MADE_BR=0
FAILED=0

ns_gemma_pids() {  # pids of gemma processes in namespace $1
  local pid cmd
  for pid in $(ip netns pids "$1" 2>/dev/null); do
    cmd="$(tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null)" || continue
    [[ "${cmd}" == *"${BIN}/gemma-"* ]] && echo "${pid}"
  done
  return 0
}

cleanup() {
  local status=$? i pid
  trap - EXIT
  set +e
  if (( status != 0 )) && [[ -n "${WORK}" ]]; then
    for f in "${WORK}"/*.out "${WORK}"/logs/*.log "${WORK}"/sshd*.log; do
      [[ -f "${f}" ]] || continue
      echo "---- last lines of ${f}"
      tail -n 25 "${f}"
    done
  fi
  for i in "${!MADE_NS[@]}"; do  # what the test started in its namespaces, by pid
    for pid in $(ns_gemma_pids "${MADE_NS[i]}"); do kill -KILL "${pid}" 2>/dev/null; done
  done
  for pid in "${SSHD_PIDS[@]}"; do kill -TERM "${pid}" 2>/dev/null; done
  for pid in "${SSHD_PIDS[@]}"; do wait "${pid}" 2>/dev/null; done
  for i in "${!MADE_NS[@]}"; do
    for pid in $(ip netns pids "${MADE_NS[i]}" 2>/dev/null); do kill -KILL "${pid}" 2>/dev/null; done
    ip netns del "${MADE_NS[i]}" 2>/dev/null
  done
  for i in 0 1; do ip link del "${VETH_HOST[i]}" 2>/dev/null; done
  (( MADE_BR )) && ip link del "${BR}" 2>/dev/null
  if [[ -n "${WORK}" && -n "${LAUNCH_TEST_KEEP:-}" ]]; then
    say "kept ${WORK}"
  elif [[ -n "${WORK}" ]]; then
    rm -rf "${WORK}"
  fi
  if (( status == 0 && ! FAILED )); then
    say "PASS (${SECONDS}s)"
  elif (( status != 77 )); then
    say "FAILED"
  fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { FAILED=1; say "FAIL: $*" >&2; exit 1; }

# --- two machines -----------------------------------------------------------------------------

if ! ip netns add "${NS[0]}" 2>/dev/null; then
  skip "ip netns add failed (no CAP_SYS_ADMIN / network namespaces here)"
fi
MADE_NS+=("${NS[0]}")
ip netns add "${NS[1]}"
MADE_NS+=("${NS[1]}")
ip link add "${BR}" type bridge
MADE_BR=1
ip addr add "10.78.${NET}.1/24" dev "${BR}"
ip link set "${BR}" up
for i in 0 1; do
  ip link add "${VETH_HOST[i]}" type veth peer name "${VETH_NS[i]}"
  ip link set "${VETH_NS[i]}" netns "${NS[i]}"
  ip link set "${VETH_HOST[i]}" master "${BR}"
  ip link set "${VETH_HOST[i]}" up
  ip -n "${NS[i]}" addr add "${ADDR[i]}/24" dev "${VETH_NS[i]}"
  ip -n "${NS[i]}" link set "${VETH_NS[i]}" up
  ip -n "${NS[i]}" link set lo up
done

WORK="$(mktemp -d /tmp/launch_cluster_test.XXXXXX)"
chmod 755 "${WORK}"
ssh-keygen -q -t ed25519 -N '' -f "${WORK}/host_key"
ssh-keygen -q -t ed25519 -N '' -f "${WORK}/id"
mkdir -p /run/sshd  # sshd's privilege separation directory
for i in 0 1; do
  cat > "${WORK}/sshd_${i}.conf" <<EOF
ListenAddress ${ADDR[i]}:22
HostKey ${WORK}/host_key
PidFile ${WORK}/sshd_${i}.pid
AuthorizedKeysFile ${WORK}/id.pub
PermitRootLogin yes
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
EOF
  /usr/sbin/sshd -t -f "${WORK}/sshd_${i}.conf" || fail "sshd rejects its config"
  ip netns exec "${NS[i]}" /usr/sbin/sshd -D -e -f "${WORK}/sshd_${i}.conf" \
    > "${WORK}/sshd_${i}.log" 2>&1 &
  SSHD_PIDS+=("$!")
done

SSH_OPTS="-i ${WORK}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
for i in 0 1; do
  ok=0
  for _ in $(seq 50); do
    # shellcheck disable=SC2086  # SSH_OPTS holds several options
    if ssh ${SSH_OPTS} -o BatchMode=yes -o ConnectTimeout=2 "${ADDR[i]}" true 2> /dev/null; then
      ok=1
      break
    fi
    sleep 0.2
  done
  (( ok )) || fail "cannot ssh to ${ADDR[i]} (sshd in ${NS[i]})"
done
say "two hosts up: ${ADDR[*]} (namespaces ${NS[*]}, sshd on port 22) ($SECONDS s)"

# --- the cluster ------------------------------------------------------------------------------

printf '# test cluster\n%s 1\n\n%s 1   # second host\n' "${ADDR[0]}" "${ADDR[1]}" > "${WORK}/hosts"
export GEMMACTL="${BIN}/gemmactl"
LC=("${LAUNCH}" "${WORK}/hosts" --cpu --insecure --model "${MODEL}" --bin "${BIN}"
    --log-dir "${WORK}/logs" --port "${PORT}" --ssh-opts "${SSH_OPTS}" --timeout 60
    --drain-timeout 15 --worker-args "--threads 1")
CTL=("${BIN}/gemmactl" --coordinator "${ADDR[0]}:${PORT}")

healthy() { "${CTL[@]}" status --json | grep -oE '"healthy": ?true' | wc -l; }
count_gemma() { local n=0 i; for i in 0 1; do n=$((n + $(ns_gemma_pids "${NS[i]}" | wc -l))); done; echo "${n}"; }

"${LC[@]}" start > "${WORK}/start1.out" 2>&1 || fail "start exited $?"
grep -q "healthy 2/2" "${WORK}/start1.out" || fail "start did not report 2/2 healthy"
grep -q "http://${ADDR[0]}:8000/v1" "${WORK}/start1.out" || fail "start did not print the OpenAI URL"
[[ "$(healthy)" == 2 ]] || fail "not 2 healthy replicas after start"
[[ "$(ns_gemma_pids "${NS[0]}" | wc -l)" -ge 2 ]] || fail "no coordinator and worker in ${NS[0]}"
[[ "$(ns_gemma_pids "${NS[1]}" | wc -l)" -ge 1 ]] || fail "no worker in ${NS[1]}"
say "start: 2/2 healthy ($SECONDS s)"

out="$("${CTL[@]}" generate --tokens 2,17,301 --max-tokens 4 2> "${WORK}/generate.err")" ||
  fail "gemmactl generate exited $?: $(cat "${WORK}/generate.err")"
[[ "${out}" =~ ^[0-9]+( [0-9]+){3}$ ]] || fail "gemmactl generate printed '${out}', want 4 token ids"
say "generate from this namespace: ${out}"

before="$(count_gemma)"
pidfiles_before="$(cat "${WORK}"/logs/*.pid)"
"${LC[@]}" start > "${WORK}/start2.out" 2>&1 || fail "a second start exited $?"
[[ "$(grep -c "already running" "${WORK}/start2.out")" == 3 ]] ||
  fail "a second start did not say the coordinator and both workers already run"
grep -q "started (pid" "${WORK}/start2.out" && fail "a second start started something"
[[ "$(count_gemma)" == "${before}" ]] || fail "gemma processes ${before} -> $(count_gemma)"
[[ "$(cat "${WORK}"/logs/*.pid)" == "${pidfiles_before}" ]] || fail "the pid files changed"
[[ "$(healthy)" == 2 ]] || fail "not 2 healthy replicas after the second start"
[[ "$("${CTL[@]}" status --json | grep -oE '"id":' | wc -l)" == 2 ]] || fail "not 2 replicas"
say "second start: nothing started, still ${before} gemma processes, 2/2 healthy"

# More replicas than there are: start gives up after --timeout, with the logs' last lines.
if "${LC[@]}" start --expect 3 --timeout 4 > "${WORK}/start3.out" 2>&1; then
  fail "start --expect 3 exited 0 with 2 workers"
fi
grep -q "only 2/3 healthy replicas after 4s" "${WORK}/start3.out" || fail "no timeout message"
grep -q "last lines of .*/worker-${ADDR[1]}.log" "${WORK}/start3.out" || fail "no log tails"
say "start --expect 3: exit 1 after its timeout, with the log tails"

"${LC[@]}" status > "${WORK}/status.out" 2>&1 || fail "status exited $?"
for a in "${ADDR[@]}"; do
  grep -q "^${a}: worker-${a}: running (pid [0-9]*)" "${WORK}/status.out" ||
    fail "status does not list the worker on ${a}"
done
grep -q "^${ADDR[0]}: coordinator: running (pid" "${WORK}/status.out" ||
  fail "status does not list the coordinator"
grep -q "2 healthy" "${WORK}/status.out" || fail "status does not show gemmactl status"
say "status lists both hosts"

"${LC[@]}" stop > "${WORK}/stop1.out" 2>&1 || fail "stop exited $?"
[[ "$(count_gemma)" == 0 ]] || fail "gemma processes left after stop: $(count_gemma)"
[[ -z "$(ls "${WORK}"/logs/*.pid 2>/dev/null)" ]] || fail "pid files left after stop"
[[ "$(grep -c "stopped (pid" "${WORK}/stop1.out")" == 3 ]] || fail "stop did not stop three"
grep -q SIGKILL "${WORK}/stop1.out" && fail "stop needed SIGKILL (the workers did not drain)"
say "stop: no gemma process left ($SECONDS s)"

"${LC[@]}" stop > "${WORK}/stop2.out" 2>&1 || fail "a second stop exited $?"
[[ "$(grep -c "not running" "${WORK}/stop2.out")" == 3 ]] || fail "a second stop did not say nothing runs"
say "second stop: nothing runs"

# With tokens: start without a token for gemmactl here stops at once naming the way out (it
# printed "healthy 0/2" until its timeout); with --token-file it waits for the replicas.
printf 'join-secret-0123456789 worker\nuser-secret-0123456789 user alice\n' > "${WORK}/tokens"
echo join-secret-0123456789 > "${WORK}/join-token"
echo user-secret-0123456789 > "${WORK}/user-token"
# (--insecure stays: plaintext on purpose; the tokens still hold.)
LC_AUTH=("${LC[@]}" --auth-tokens "${WORK}/tokens" --join-token-file "${WORK}/join-token"
         --expect 1)
started=${SECONDS}
if env -u GEMMA_TOKEN "${LC_AUTH[@]}" start > "${WORK}/start5.out" 2>&1; then
  fail "start with --auth-tokens and no token here exited 0"
fi
grep -q "cannot read the cluster's status: .*UNAUTHENTICATED" "${WORK}/start5.out" ||
  fail "start without a token did not name the refusal: $(tail -n 3 "${WORK}/start5.out")"
grep -q -- "--token-file" "${WORK}/start5.out" || fail "start without a token did not name --token-file"
(( SECONDS - started < 40 )) || fail "start without a token took $((SECONDS - started)) s"
env -u GEMMA_TOKEN "${LC_AUTH[@]}" --token-file "${WORK}/user-token" start > "${WORK}/start6.out" 2>&1 ||
  fail "start with --token-file exited $?: $(tail -n 5 "${WORK}/start6.out")"
grep -q "healthy [12]/1" "${WORK}/start6.out" || fail "start with --token-file did not see the replicas"
"${LC[@]}" stop > "${WORK}/stop3.out" 2>&1 || fail "stop after the token start exited $?"
[[ "$(count_gemma)" == 0 ]] || fail "gemma processes left after stop: $(count_gemma)"
say "with tokens: no token here named at once; --token-file waits for the replicas"

# Open without --insecure: the coordinator refuses to start, and start says so at once.
LC_OPEN=()
for a in "${LC[@]}"; do [[ "${a}" == --insecure ]] || LC_OPEN+=("${a}"); done
if "${LC_OPEN[@]}" start > "${WORK}/start4.out" 2>&1; then
  fail "start without --insecure, TLS or tokens exited 0"
fi
grep -q "coordinator: exited at once" "${WORK}/start4.out" || fail "no 'exited at once'"
[[ "$(count_gemma)" == 0 ]] || fail "gemma processes after a refused start"
say "start without --insecure: refused, nothing left"
