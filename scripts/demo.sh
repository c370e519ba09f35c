#!/usr/bin/env bash
# The live-patch demo, from a fresh machine: install the package into .venv and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)  # Debian splits venv off
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
export PATH="$PWD/.venv/bin:$PATH"
exec fentry-build demo "$@"
