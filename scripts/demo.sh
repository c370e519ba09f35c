#!/usr/bin/env bash
# The live-patch demo, from a fresh machine: install the package into .venv and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc libc6-dev; }
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
export PATH="$PWD/.venv/bin:$PATH"
exec fentry-build demo "$@"
