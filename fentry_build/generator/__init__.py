"""generator/ - from a patch source and the built program to the registration C source
(``python -m fentry_build.gen``), and patch skeletons (``fentry-build new-patch``)."""
