#!/usr/bin/env bash
# The Python environment of the tests that drive the cluster with clients we did not write:
# .venv-test with the official OpenAI client from PyPI, pinned (idempotent; quiet when ready).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-test"
OPENAI_VERSION="3.63.0"

if "${VENV}/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '${OPENAI_VERSION}')" \
    2>/dev/null; then
  exit 0
fi
echo "python_env.sh: creating ${VENV} (openai==${OPENAI_VERSION})"
python3 -m venv "${VENV}"
"${VENV}/bin/pip" install --quiet --disable-pip-version-check "openai==${OPENAI_VERSION}"
