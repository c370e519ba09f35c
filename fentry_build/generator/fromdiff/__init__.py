"""fentry_build.generator.fromdiff - `fentry-build patch-from-diff`: the live patch a fix makes.

The user writes the fix as an ordinary source change; this package writes patches/NAME.c,
a readable patch source for the running build.  One concern per module:

- (compile_commands.json and the compile lines of its entries: generator/compile_db.py)
- trees: the original and the fixed source trees (a diff applied with git apply)
- units: the translation units linked into the running binary (its DWARF)
- objdiff: which functions and variables differ between two objects (pyelftools)
- extract: what a function's source needs, read with libclang
- plan: which functions the patch replaces, carries or references
- refusals: what a function-level live patch cannot do, one line each
- writer: the patch source (templates/patch_from_diff.c.j2)
- (the project's list of patches: fentry_build/build/patchlist.py)
- command: the whole run
"""
