"""fentry_build_fromdiff - a live patch generated from a source diff (issue 17), phase 1.

Temporary home, outside the package while its layout moves; it becomes
fentry_build/generator/fromdiff/.  One concern per module:

- compile_db: compile_commands.json and the compile lines made from it
- trees: the original and the fixed source trees (a diff applied with git apply)
- units: the translation units linked into the running binary (its DWARF)
- objdiff: which functions and data differ between two objects (pyelftools)
- extract: what a function's source needs, read with libclang
- plan: which functions the patch replaces, copies or references; refusals
- writer: the patch source
- main: the command
"""
