# Sourced by run.sh and test.sh: a virtual environment in .venv with the package
# installed (editable) and the extras named in $VEHICLENET_EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip 25.0 or newer, so that `pip show vehiclenet` prints the licence: older ones show only the
# legacy "License:" field, empty for a PEP 639 licence expression. No download when it already is.
.venv/bin/python -m pip install -q --disable-pip-version-check "pip>=25"
# Editable (PEP 660), built by the setuptools pyproject.toml names.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${VEHICLENET_EXTRAS:-}"
