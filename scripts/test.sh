#!/usr/bin/env bash
# The whole test suite: sets up .venv (package + test extras) and runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k download` or `-m "not slow"` (a quick
# round without the ~25 tests marked slow); the 20 slowest are listed at the end.
VEHICLENET_EXTRAS="[test]" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest -q --durations=20 "$@" tests
