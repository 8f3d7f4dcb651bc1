"""The release of this package: the tag of the image the Dockerfile builds (services and sidecar)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("ensemble-operator")
except PackageNotFoundError:  # run from a source tree that was not installed
    VERSION = "0.1.0"
