#!/usr/bin/env bash
# The whole test suite, from a fresh machine: build the wheel, install it (with the
# test extras) into .venv, and run pytest against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v setpriv >/dev/null || need+=(util-linux)
command -v gdb >/dev/null || need+=(gdb)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip build
rm -rf dist
.venv/bin/python -m build -q --wheel --outdir dist . >/dev/null
wheel=$(ls dist/fentry_build-*.whl)
.venv/bin/python -m pip install -q --force-reinstall "${wheel}[test]"

# pytest's own script (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed wheel; FENTRY_TEST_INSTALLED makes a test check that.
export FENTRY_TEST_INSTALLED=1
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/pytest -q -p no:cacheprovider "$@" tests
