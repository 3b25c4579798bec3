#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, builds, runs every ctest tier
# that runs without a GPU (unit, golden, equivalence, cluster), then the fuzzers for
# FUZZ_SECONDS (default 30) each.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

scripts/build.sh -DGEMMA_BUILD_TESTS=ON
# The official OpenAI client (PyPI) for the tests of the OpenAI-compatible API.
scripts/python_env.sh
# Idle pool threads block rather than spin, and BLAS stays single-threaded inside our pool.
export OPENBLAS_NUM_THREADS=1
ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 600
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
