#!/usr/bin/env bash
# Bounded load test on loopback (scripts/load_test.py): a coordinator and two gemma-workers of
# the tiny MoE checkpoint under thousands of concurrent HTTP streams (the official openai
# client) and dozens of gRPC ones (gemmactl); the coordinator's and the workers' peak RSS and
# descriptors and their return to the baseline; the admission limits' refusals (429 with an
# OpenAI-shaped body naming the limit); normal clients' latency beside stalled HTTP clients.
# Exits 1 when any stream hung, was reset, failed otherwise or differed from the reference.
# Uses the binaries already in build/bin (scripts/build.sh builds them) and .venv-test's
# interpreter when there is one (scripts/python_env.sh makes it), else python3.
#   scripts/load_test.sh [--streams N] [--timeout S] [--json-out FILE] ...
#   scripts/load_test.sh --help      lists every flag
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${repo}/.venv-test/bin/python"
[[ -x "${python}" ]] || python="python3"
exec "${python}" "${repo}/scripts/load_test.py" "$@"
