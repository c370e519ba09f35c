"""build/ - what a user's build needs: the Meson subproject, the SCons tool, project
scaffolding, the instrumentation flags and the shared shim."""
