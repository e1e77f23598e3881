#!/usr/bin/env bash
# The whole test suite: sets up .venv (package + test extras) and runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k download`.
VEHICLENET_EXTRAS="[test]" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest -q "$@" tests
