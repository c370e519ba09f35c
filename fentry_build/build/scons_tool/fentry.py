"""fentry.py - the SCons tool module `fentry`: env.Tool('fentry', toolpath=[fentry_build.scons.TOOLPATH]).

Everything lives in fentry_build.scons; this file only lets SCons find it by name.
"""

from fentry_build.build.scons import exists, generate

__all__ = ["exists", "generate"]
