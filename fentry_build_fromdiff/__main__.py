"""python -m fentry_build_fromdiff -> main.main"""

from fentry_build_fromdiff.main import main

raise SystemExit(main())
