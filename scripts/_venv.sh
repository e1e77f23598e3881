# Sourced by run.sh and test.sh: a virtual environment in .venv with the package
# installed (editable) and the extras named in $VEHICLENET_EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${VEHICLENET_EXTRAS:-}"
