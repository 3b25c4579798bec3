#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, ASan) in a separate build dir and runs each for N
# seconds on a copy of its committed seed corpus. Exits non-zero if a fuzzer finds a crash.
#
# Usage: scripts/fuzz.sh [SECONDS]   (default: $FUZZ_SECONDS or 30)
#        FUZZ_BUILD_DIR=build-fuzz   build directory, relative to the repository root or absolute
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_FUZZER="${1:-${FUZZ_SECONDS:-30}}"
BUILD_DIR="${FUZZ_BUILD_DIR:-build-fuzz}"
[[ "${BUILD_DIR}" = /* ]] || BUILD_DIR="${ROOT}/${BUILD_DIR}"
FUZZERS=(safetensors_fuzzer config_fuzzer tokenizer_fuzzer chat_template_fuzzer
  openai_request_fuzzer batch_line_fuzzer request_checks_fuzzer)
declare -A CORPUS=([safetensors_fuzzer]=safetensors [config_fuzzer]=config
  [tokenizer_fuzzer]=tokenizer [chat_template_fuzzer]=chat_template
  [openai_request_fuzzer]=openai_request [batch_line_fuzzer]=batch_line
  [request_checks_fuzzer]=request_checks)

if ! [[ "${SECONDS_PER_FUZZER}" =~ ^[0-9]+$ ]] || (( SECONDS_PER_FUZZER < 1 )); then
  echo "fuzz.sh: seconds must be a positive integer, got '${SECONDS_PER_FUZZER}'" >&2
  exit 2
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
CC=clang-14 CXX=clang++-14 cmake -S "${ROOT}" -B "${BUILD_DIR}" "${GENERATOR[@]}" \
  -DGEMMA_BUILD_FUZZERS=ON -DGEMMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "${BUILD_DIR}" --target "${FUZZERS[@]}"

status=0
for fuzzer in "${FUZZERS[@]}"; do
  # Work on a copy: libFuzzer adds new inputs to its first corpus directory.
  work="${BUILD_DIR}/fuzz-run/${fuzzer}"
  rm -rf "${work}"
  mkdir -p "${work}/corpus" "${work}/artifacts"
  cp -r "${ROOT}/tests/fuzz/corpus/${CORPUS[${fuzzer}]}/." "${work}/corpus/"
  echo "=== ${fuzzer}: ${SECONDS_PER_FUZZER}s"
  if "${BUILD_DIR}/bin/${fuzzer}" -max_total_time="${SECONDS_PER_FUZZER}" \
      -artifact_prefix="${work}/artifacts/" -print_final_stats=1 \
      "${work}/corpus" >"${work}/log.txt" 2>&1; then
    grep -E "^stat::number_of_executed_units|^#[0-9]+.*DONE" "${work}/log.txt" || true
  else
    status=1
    tail -n 60 "${work}/log.txt" >&2
    echo "=== ${fuzzer} FAILED; reproducer(s): $(ls "${work}/artifacts" | tr '\n' ' ')" >&2
  fi
done
if (( status == 0 )); then echo "fuzz.sh: no crashes"; fi
exit "${status}"
