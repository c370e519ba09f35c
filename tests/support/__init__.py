"""Helpers the test modules share: builds, servers, the CLI and another uid.

Test modules import from here (``from support.builds import build_program``) and take
fixtures from tests/conftest.py; they never import each other.  tests/ has no
__init__.py on purpose: pytest then puts tests/ (not the repository) on sys.path, so the
tests import the installed fentry_build when scripts/test.sh asks for it.
"""
