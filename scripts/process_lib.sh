# shellcheck shell=bash
# Process bookkeeping for scripts that start servers (scripts/demo.sh,
# scripts/gpu_cluster_check.sh). Sourced; reads /proc only, so it needs no procps.

# "pid ppid pgid state" for every process.
proc_table() {
  local f line st pp pg
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "${f}" || continue
    # After the command name, which may hold spaces: state, ppid, process group.
    read -r st pp pg _ <<< "${line##*) }"
    echo "${line%% *} ${pp} ${pg} ${st}"
  done
}

# Pids alive (zombies excluded) in the given process groups or below the given pids.
tracked_pids() {
  [[ $# -gt 0 ]] || return 0
  proc_table | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) { root[r[i]] = 1 } }
    $4 !~ /^Z/ { pid[NR] = $1; ppid[NR] = $2; pgid[NR] = $3 }
    END {
      for (k in pid) if ((pgid[k] in root) || (pid[k] in root)) keep[pid[k]] = 1
      do {
        changed = 0
        for (k in pid) {
          if (!(pid[k] in keep) && (ppid[k] in keep)) { keep[pid[k]] = 1; changed = 1 }
        }
      } while (changed)
      for (p in keep) print p
    }'
}

# Whether process $1 runs (a zombie does not).
alive() {
  local line
  read -r line 2>/dev/null < "/proc/$1/stat" || return 1
  [[ "${line##*) }" != Z* ]]
}

# start_server NAME LOGFILE COMMAND...: runs COMMAND as the leader of a new session (so its
# whole process group can be signalled), output to LOGFILE; appends NAME to the caller's NAMES
# and the process group to PGIDS.
start_server() {
  local name="$1" logfile="$2"
  shift 2
  setsid "$@" > "${logfile}" 2>&1 < /dev/null &
  NAMES+=("${name}")
  PGIDS+=("$!")
}
