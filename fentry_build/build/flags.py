"""build/flags.py - the one home of the compiler and linker flags of programs, patches and the shim.

shim/meson.build says the same for Meson (tests/test_facts.py fails when the two drift);
the SCons tool, the shared shim, the tests and the benchmarks take them from here.
"""

from __future__ import annotations

# What dependency('fentry') gives a program: the instrumentation on compile lines only
# (never at link: -pg there would link gcrt1.o and write gmon.out).  -mrecord-mcount
# lists the sites for jump mode; -flive-patching=inline-clone keeps GCC from making copies
# a patch cannot reach (docs/how-it-works.md, "IPA clones"); -g whatever the build type:
# the generator reads prototypes, inlined copies and variables from DWARF, and -g never
# changes the code GCC emits; -fdump-ipa-clones writes beside each object the inline
# decisions GCC made, which name the callers of an inlined copy DWARF does not record
# (binary/ipaclones.py), and changes no code either.
LINKED_INSTRUMENT_ARGS = ["-pg", "-mfentry", "-mrecord-mcount", "-flive-patching=inline-clone",
                          "-g", "-fdump-ipa-clones"]

# On the program's link line: the build-id the generator and the loader match on, and the
# exports patches (the shadow-variable API) and instrumented libraries (__fentry__) need.
PROGRAM_LINK_ARGS = ["-Wl,--build-id=sha1", "-Wl,--export-dynamic-symbol=fentry_shadow_*",
                     "-Wl,--export-dynamic-symbol=__fentry__"]

# What a program built for the preload and attach modes is compiled with: the linked
# mode's flags without -mrecord-mcount (its site list needs the shim linked into the
# program - see shim/arch/x86_64/entry.S - and only jump mode uses it).
UNLINKED_INSTRUMENT_ARGS = [a for a in LINKED_INSTRUMENT_ARGS if a != "-mrecord-mcount"]

# Where a program's fentry sites get their unpatched form (docs/how-it-works.md): "prepared"
# in the file as it is linked (build/prepare.py; the default of the Meson option `sites` and
# of SCons's FENTRY_SITES), or at start by the shim from -mrecord-mcount's list ("runtime").
# A prepared program is compiled without -mrecord-mcount: its list would only cost
# relocations at every start.
SITES = ("prepared", "runtime")
DEFAULT_SITES = "prepared"
PREPARED_INSTRUMENT_ARGS = UNLINKED_INSTRUMENT_ARGS

# The shim is never instrumented (it must not call __fentry__ itself) and never takes the
# user's flags; -Werror keeps it warning-free wherever it is built.
SHIM_CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-D_GNU_SOURCE"]

# The libraries the shim needs, for programs and the shared shim alike.
SHIM_LIBS = ["pthread", "dl"]

__all__ = ["DEFAULT_SITES", "LINKED_INSTRUMENT_ARGS", "PREPARED_INSTRUMENT_ARGS",
           "PROGRAM_LINK_ARGS", "SHIM_CFLAGS", "SHIM_LIBS", "SITES", "UNLINKED_INSTRUMENT_ARGS"]
