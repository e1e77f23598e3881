#!/usr/bin/env bash
# The main job: sets up .venv and runs `vehiclenet ARGS` (default: `download`, which
# fetches the published checkpoint into the cache and verifies its sha256).
source "$(dirname "$0")/_venv.sh"
[ "$#" -gt 0 ] || set -- download
exec .venv/bin/vehiclenet "$@"
