"""A Docker engine for the image and compose tests: what is missing where there is none, and the image, built once.

Where no image registry is reachable the Dockerfile's default base (``python:3.11-slim-bookworm``) cannot be
pulled: ``.ci/docker-engine`` makes ``ensemble-base:bookworm`` with debootstrap, and the tests build on it.
``ENSEMBLE_BASE`` names another base (one you can pull, say).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BASE = "ensemble-base:bookworm"
#: The tag the tests build the Dockerfile into (never the release's name).
TEST_IMAGE = "ensemble-operator:test"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; fails the test with its stderr on an error (``check``)."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


@functools.cache
def engine_problem() -> str | None:
    """Why no container can run here, or None when a Docker engine answers."""
    try:
        import docker as sdk

        sdk.from_env().ping()
    except Exception as exc:
        return (
            f"no Docker engine answers ({type(exc).__name__}): run .ci/docker-engine as root to install and start "
            "Debian's, or start yours"
        )
    return None


@functools.cache
def base_image() -> str | None:
    """The base to build on: ``ENSEMBLE_BASE``, else the local debootstrap base when the engine has it."""
    chosen = os.environ.get("ENSEMBLE_BASE")
    if chosen:
        return chosen
    found = docker("image", "inspect", LOCAL_BASE, check=False)
    return LOCAL_BASE if found.returncode == 0 else None


def image_problem() -> str | None:
    """Why the image cannot be built here, or None."""
    problem = engine_problem()
    if problem:
        return problem
    if base_image() is None:
        return (
            f"no base image: no registry is reachable here, so make {LOCAL_BASE} with .ci/docker-engine "
            "(debootstrap), or set ENSEMBLE_BASE to a base your engine can pull"
        )
    return None


def compose_problem() -> str | None:
    """Why the compose stack cannot run here, or None."""
    problem = image_problem()
    if problem:
        return problem
    if docker("compose", "version", check=False).returncode != 0:
        return "the docker compose v2 plugin is not installed (.ci/docker-engine installs Debian's)"
    return None


@functools.cache
def built_image() -> str:
    """The Dockerfile built once per session on :func:`base_image`; its tag."""
    base = base_image()
    assert base is not None
    docker("build", "--quiet", "--build-arg", f"BASE={base}", "--tag", TEST_IMAGE, ".", timeout=900)
    return TEST_IMAGE
