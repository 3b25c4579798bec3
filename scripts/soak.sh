#!/usr/bin/env bash
# Soak test, not run in CI (scripts/soak.py): a local cluster (gemma-coordinator and three
# gemma-workers of the tiny MoE checkpoint, one with two CPU ranks) under N minutes (default 10)
# of mixed gRPC and HTTP traffic and random faults (rank, worker and coordinator kills, SIGSTOP,
# drains); counts requests sent, completed, failed, wrong, duplicated and lost, and exits 1 when
# any was lost or wrong. Uses the binaries already in build/bin (scripts/build.sh builds them)
# and .venv-test's interpreter when there is one (scripts/python_env.sh makes it), else python3.
#   scripts/soak.sh [--minutes M] [--fault-interval MIN MAX] [--json-out FILE] [--keep-logs] ...
#   scripts/soak.sh --help      lists every flag
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${repo}/.venv-test/bin/python"
[[ -x "${python}" ]] || python="python3"
exec "${python}" "${repo}/scripts/soak.py" "$@"
