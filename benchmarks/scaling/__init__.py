"""The scaling section of benchmarks/run.py: generated programs of N functions, patches of K.

Rows live in ``rows_*.py`` modules of this package, each a function registered with
``@harness.row(...)``; harness.run_rows() finds every module, runs the rows asked for and
returns their results, and harness.section() writes them into RESULTS.md.  See
benchmarks/README.md for how to add a row.
"""
