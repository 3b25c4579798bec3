#!/usr/bin/env bash
# Configures and builds the project into build/ (binaries in build/bin/). Extra arguments go to
# the CMake configure step, e.g. scripts/build.sh -DGEMMA_BUILD_TESTS=OFF.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"${ROOT}/scripts/setup_deps.sh"
cmake -S "${ROOT}" -B "${ROOT}/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "${ROOT}/build" -j "$(nproc)"
