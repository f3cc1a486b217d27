#!/usr/bin/env bash
# Runs the any-language examples' tests: installs the pinned Python packages into .venv and the
# Node.js packages into node/node_modules (both ignored by git), then runs pytest against the
# servers on loopback. Needs python3 with venv, node and npm, and the relay binary
# (`cargo build -p outbox-relay`, or OUTBOX_RELAY_BIN). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
(cd node && npm ci --silent --no-audit --no-fund)

exec .venv/bin/python -m pytest -q tests "$@"
