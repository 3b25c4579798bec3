#!/usr/bin/env bash
# The Python environment of the tests that use tools we did not write: .venv-test with the
# official OpenAI client and kubernetes-validate (the Kubernetes schemas, for the manifests),
# from PyPI, pinned (idempotent; quiet when ready).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-test"
PINS=("openai==3.63.0" "kubernetes-validate==1.37.0" "PyYAML==6.0.4" "jsonschema==4.26.0")

if "${VENV}/bin/python" - "${PINS[@]}" 2>/dev/null <<'PYEOF'
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PYEOF
then
  exit 0
fi
echo "python_env.sh: making ${VENV} (${PINS[*]})"
[[ -x "${VENV}/bin/python" ]] || python3 -m venv "${VENV}"
"${VENV}/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
