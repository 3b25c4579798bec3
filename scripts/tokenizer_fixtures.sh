#!/usr/bin/env bash
# Regenerates the tokenizer fixtures (tests/golden/data/tokenizer) with the Hugging Face
# libraries: trains the test tokenizers, then writes the golden outputs; then trains the
# 512-entry tokenizer of the tiny checkpoints (scripts/tiny_tokenizer.py:
# tests/golden/data/tiny-{moe,dense}/tokenizer.json), checked against build/bin/gemma-tokenize
# when that is built. Needs the Debian package bible-kjv (training text) and PyPI; CI never runs
# this, it uses the committed files.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${repo}/.venv-tools"
if ! command -v bible >/dev/null; then
  echo "tokenizer_fixtures.sh: needs the 'bible' program: apt-get install bible-kjv" >&2
  exit 1
fi
if [[ ! -x "${venv}/bin/python" ]]; then
  python3 -m venv "${venv}"
fi
"${venv}/bin/pip" install --quiet "tokenizers==0.23.3" "transformers==5.23.0" jinja2
kjv="$(mktemp)"
trap 'rm -f "${kjv}"' EXIT
bible -f -l 100000 "gen1:1-rev22:21" | sed -E 's/^[^ ]+[0-9]+:[0-9]+ //' > "${kjv}"
"${venv}/bin/python" "${repo}/scripts/train_tokenizer.py"
KJV_TEXT="${kjv}" "${venv}/bin/python" "${repo}/scripts/make_tokenizer_golden.py"
"${venv}/bin/python" "${repo}/scripts/make_tf5_tokenizer.py"
check=()
if [[ -x "${repo}/build/bin/gemma-tokenize" ]]; then
  check=(--check "${repo}/build/bin/gemma-tokenize")
fi
"${venv}/bin/python" "${repo}/scripts/tiny_tokenizer.py" "${check[@]}"
