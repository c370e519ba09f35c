"""binary/ - reading built ELF files: symbols, build-id, fentry sites and DWARF (pyelftools)."""
