"""kubectl for the tests that render the manifests with its built-in kustomize: which one, or why there is none.

The manifests use kustomize v5 features (``components``, ``labels``, ``replacements``): a kubectl whose
kustomize is older (Debian bookworm's 1.20) cannot render them, so it counts as missing. ``make test`` puts
one on PATH (``.ci/install-kubectl``: Debian trixie's, unpacked outside the repository); a plain
``pytest`` run without one skips those tests with :func:`missing` as the one reason, and the session's
header says so before any test runs.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

#: The kustomize major version the manifests need.
KUSTOMIZE_MAJOR = 5
HOW = 'run `make test`, which installs one (.ci/install-kubectl), or PATH="$(.ci/install-kubectl):$PATH" pytest'


@functools.cache
def found() -> tuple[str | None, str]:
    """(the kubectl to run, its kustomize version), or (None, why none can be used)."""
    path = shutil.which("kubectl")
    if path is None:
        return None, f"no kubectl on PATH to render the manifests with its kustomize v{KUSTOMIZE_MAJOR}: {HOW}"
    try:
        out = subprocess.run([path, "version", "--client"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} does not run ({exc}): {HOW}"
    version = re.search(r"Kustomize Version: v(\d+)[.\d]*", out.stdout)
    if version is None or int(version.group(1)) < KUSTOMIZE_MAJOR:
        said = version.group(0) if version else (out.stdout or out.stderr).strip()[:80] or "no version"
        return None, f"{path} has no kustomize v{KUSTOMIZE_MAJOR} ({said}), which the manifests need: {HOW}"
    return path, version.group(0)


def kubectl() -> str | None:
    """The kubectl to run, or None (then :func:`missing` says why)."""
    return found()[0]


def missing() -> str:
    """Why the kubectl tests skip ("" when they run)."""
    path, said = found()
    return "" if path else said
