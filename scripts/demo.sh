#!/usr/bin/env bash
# The main job on the embedded default model: builds, then greedily generates on the committed
# tiny Gemma 4 MoE checkpoint (tests/golden/data/tiny-moe, random weights), printing the prompt
# ids and the generated ids. Point MODEL at a downloaded Gemma 4 checkpoint directory to run a
# real one: MODEL=/path/to/gemma-4-26b-a4b scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

MODEL="${MODEL:-tests/golden/data/tiny-moe}"
PROMPT="${PROMPT:-2,105,17,301,42,7,256,106,107,105,88,107}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"

scripts/build.sh -DGEMMA_BUILD_TESTS=OFF
echo "model:        ${MODEL}"
echo "prompt ids:   ${PROMPT//,/ }"
printf "generated:    "
build/bin/gemma-generate --model "${MODEL}" --tokens "${PROMPT}" --max-new-tokens "${MAX_NEW_TOKENS}"
