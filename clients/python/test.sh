#!/usr/bin/env bash
# Tests of the Python publisher against a real gateway (target/debug/switchboard, or
# $SWITCHBOARD_BIN) and a private redis-server the tests start and stop themselves.
# Run from anywhere; scripts/test calls it after `cargo test`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

venv="$repo/target/pyenv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
"$venv/bin/python" -m pip install -q -e "clients/python[test]"

if [ -z "${SWITCHBOARD_BIN:-}" ] && [ ! -x "$repo/target/debug/switchboard" ]; then
    echo "clients/python/test.sh: building the gateway (cargo build)" >&2
    cargo build --quiet
fi

exec "$venv/bin/python" -m pytest -q clients/python/tests "$@"
