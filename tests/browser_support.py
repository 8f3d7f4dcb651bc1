"""A real headless browser for the report's tests: Debian's Chromium driven by Playwright.

Playwright's own browser builds are never downloaded: the tests launch ``/usr/bin/chromium`` (what
``.ci/install-chromium`` installs as root). Where it or the ``playwright`` package is missing the tests
skip, saying which and how to get it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


def browser_problem() -> str | None:
    """Why no browser test can run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install -e '.[test]' (make test does)"
    if not CHROMIUM.is_file():
        return (
            f"no Chromium at {CHROMIUM}: as root run .ci/install-chromium (make test does), "
            "or apt-get install -y chromium"
        )
    return None
