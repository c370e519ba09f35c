"""``python -m fentry_build`` is the ``fentry-build`` command."""

from fentry_build.cli import main

raise SystemExit(main())
