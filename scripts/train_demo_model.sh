#!/usr/bin/env bash
# Trains the demo model (scripts/train_demo_model.py) into models/kjv-moe: makes the pinned
# virtualenv the golden generator uses (.venv-golden, the same pins), installs Debian's
# bible-kjv for the text when missing, then trains on the CPU (about 40 minutes on 2 cores).
# CI does not run this; the model is committed.
#   scripts/train_demo_model.sh [--steps N] [--out DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO}/.venv-golden"
PINS=("torch==2.15.0" "transformers==5.23.0" "safetensors==0.8.0" "numpy==2.4.6" "tokenizers==0.23.3")

if ! command -v bible >/dev/null; then
  SUDO=(); (( EUID == 0 )) || SUDO=(sudo)
  "${SUDO[@]}" apt-get install -y -qq bible-kjv >/dev/null
fi
if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "creating ${VENV}"
  python3 -m venv "${VENV}"
fi
"${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
exec "${VENV}/bin/python" "${REPO}/scripts/train_demo_model.py" "$@"
