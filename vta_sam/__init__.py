"""The `vta-sam` command: one front for every stage, so an installed user never needs the Makefile."""
