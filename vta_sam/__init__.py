"""The `vta-sam` command: one front for every stage, so an installed user never needs the Makefile."""

from importlib import metadata

try:
    __version__ = metadata.version("vta-sam")
except metadata.PackageNotFoundError:  # run from a checkout that pip has not installed
    __version__ = "unknown (not installed)"
