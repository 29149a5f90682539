#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # first: the CPU build (SPEC §5)
python3 -m pip install -q -e '.[test]'
# Headless Chromium for the dashboard test (Debian's package; no browser downloads).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium missing and cannot be installed here (need root + apt-get)" >&2
  fi
fi
# SPEC §7's import contracts (pyproject.toml [tool.importlinter]) and the linter, before the suite.
lint-imports --no-cache >/dev/null || { lint-imports --no-cache; exit 1; }
ruff check --quiet .
exec python3 -m pytest -q "$@"
