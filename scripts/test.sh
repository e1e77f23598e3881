#!/usr/bin/env bash
# The whole test suite: sets up .venv (package + test extras) and runs pytest in two worker
# processes (pytest-xdist; a test file stays on one worker, so its fixtures are built once; each
# worker runs its OpenMP/BLAS threads on its share of the cores, see tests/conftest.py).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k download`, `-m "not slow"` (a quick
# round without the ~30 tests marked slow) or `-n 0` (one process); the 20 slowest are listed at the end.
VEHICLENET_EXTRAS="[test]" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=20 "$@" tests
