#!/usr/bin/env bash
# Regenerate the golden fixtures under tests/golden/data/ (see docs/golden.md).
#
# Creates <repo>/.venv-golden on first use with pinned package versions, then runs
# scripts/make_golden.py. Safe to re-run: the venv is reused, and the fixture folders
# it owns are rewritten (byte-identical output for the same pinned versions).
# CI does not run this; the fixtures are committed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO}/.venv-golden"
PYTHON="${PYTHON:-python3}"

# Pinned: these produced the committed fixtures.
PINS=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
)

if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "creating ${VENV}"
  "${PYTHON}" -m venv "${VENV}"
fi

# pip is a no-op when the pinned versions are already installed.
"${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"

exec "${VENV}/bin/python" "${REPO}/scripts/make_golden.py" "$@"
