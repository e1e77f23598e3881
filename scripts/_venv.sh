# Sourced by run.sh and test.sh: a virtual environment in .venv with the package
# installed (editable) and the extras named in $VEHICLENET_EXTRAS.
#
# The package is installed editable, so code changes need no reinstall; only what pip reads
# does (pyproject.toml, setup.py, the extras asked for). A stamp in .venv records a hash of
# those for each set of extras installed; when it matches, nothing is installed and nothing
# printed (a reinstall took ~3.5 s and printed setuptools' banner on every run.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras=${VEHICLENET_EXTRAS:-}
want=$(.venv/bin/python - "$extras" <<'EOF'
import hashlib, sys
digest = hashlib.sha256(sys.argv[1].encode() + b"\0")
for name in ("pyproject.toml", "setup.py"):
    with open(name, "rb") as f:
        digest.update(f.read() + b"\0")
print(digest.hexdigest())
EOF
)
# Any stamp with the same hash will do without extras (an install with extras holds more).
installed() {
  local stamp
  for stamp in .venv/.vehiclenet-installed"$1"*; do
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  done
  return 1
}
install() {
  # pip 25.0 or newer, so that `pip show vehiclenet` prints the licence: older ones show only the
  # legacy "License:" field, empty for a PEP 639 licence expression. No download when it already is.
  .venv/bin/python -m pip install -q --disable-pip-version-check "pip>=25" &&
  # Editable (PEP 660), built by the setuptools pyproject.toml names.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
}
if ! installed "$extras"; then
  # One line instead of pip's and setuptools' warnings; the whole output when it fails.
  echo "setting up .venv: installing the package${extras:+ with $extras} and its dependencies (log: .venv/install.log)" >&2
  if ! install > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "setting up .venv failed (the output above is in .venv/install.log)" >&2
    exit 1
  fi
  echo "$want" > ".venv/.vehiclenet-installed${extras}"
fi
