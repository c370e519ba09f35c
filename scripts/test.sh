#!/usr/bin/env bash
# The whole test suite, from a fresh machine: build the wheel, install it (with the
# test extras) into .venv, check the code (ruff, mypy --strict), and run pytest against
# the installed package.
#
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --fast     the everyday lane: without the tests marked slow or
#                                   stress (pyproject.toml lists the markers)
# Both run on two pytest-xdist workers, one test file per worker (the tests build and run
# real programs; they are written to pass on a loaded machine).  Naming test files runs
# them in this process, one after another; other arguments go to pytest (-x, -k NAME).
set -euo pipefail
cd "$(dirname "$0")/.."

lane=()
args=()
where=(tests)   # every test, unless some test files or folders are named
workers=(-n 2 --dist loadfile)
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    lane=(-m "not slow and not stress")
  else
    args+=("$arg")
    case "$arg" in tests/*) where=(); workers=() ;; esac
  fi
done

need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v setpriv >/dev/null || need+=(util-linux)
command -v gdb >/dev/null || need+=(gdb)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)  # Debian splits venv off
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip build
rm -rf dist
.venv/bin/python -m build -q --wheel --outdir dist . >/dev/null
wheel=$(ls dist/fentry_build-*.whl)
# The dependencies as the wheel asks for them (kept when already there), then this
# checkout's build of the package itself, always (its version number does not change).
.venv/bin/python -m pip install -q "${wheel}[test]"
.venv/bin/python -m pip install -q --force-reinstall --no-deps "${wheel}"

# The code itself: lint and strict typing (configured in pyproject.toml); silent when clean.
.venv/bin/ruff check -q fentry_build tests benchmarks ansible
.venv/bin/mypy --no-error-summary fentry_build

# pytest's own script (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed wheel; FENTRY_TEST_INSTALLED makes a test check that.
export FENTRY_TEST_INSTALLED=1
# The commands the tests start (python -m fentry_build ...) run from this folder; without
# this, python -m would put it first on sys.path and import the checkout, not the wheel.
export PYTHONSAFEPATH=1
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/pytest -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} ${lane[@]+"${lane[@]}"} ${args[@]+"${args[@]}"} ${where[@]+"${where[@]}"}
