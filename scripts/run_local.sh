#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job: the README's run command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # first: the CPU build (SPEC §5)
python3 -m pip install -q -e '.[test]'
exec python3 scripts/demo_cluster.py "$@"
