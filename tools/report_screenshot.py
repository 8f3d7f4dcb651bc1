"""Make the README's picture of the run report, docs/img/report.png.

    .venv/bin/python tools/report_screenshot.py [OUT.png] [--ensemble FILE] [--trace JOBS] [--report HTML]

Simulates FILE on the recorded trace JOBS (default: the seed-gke ascending run in ../shared/data, so the
recorded run is overlaid), writes its report, opens it in Debian's Chromium (Playwright, headless,
offline), hovers the first scale decision so its reason shows, and saves a screenshot of the whole page
to OUT.png (default docs/img/report.png). ``--report HTML`` screenshots that report instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_cli.main import main as ensemble  # noqa: E402
from tests.browser_support import CHROMIUM, browser_problem  # noqa: E402

#: Relative to the repository (the command runs there), so the page names the files as a reader would.
SEED = Path("..") / "shared" / "data" / "seed-gke" / "run5-ascending"


def screenshot(page_path: Path, out: Path) -> None:
    """A full-page screenshot of a report with the first scale decision's reason showing."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
            page = context.new_page()
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-drawn=true]")
            scale = page.locator("svg.timeline polygon.decision")
            if scale.count():
                scale.nth(min(1, scale.count() - 1)).hover()
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "docs" / "img" / "report.png"))
    parser.add_argument("--ensemble", default=str(SEED / "ensemble.yaml"))
    parser.add_argument("--trace", default=str(SEED / "jobs.jsonl"))
    parser.add_argument("--report", help="screenshot this report instead of simulating one")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    report = Path(args.report).resolve() if args.report else None
    # files named on the command line are relative to where it was run; the defaults to the repository
    if args.ensemble != str(SEED / "ensemble.yaml"):
        args.ensemble = str(Path(args.ensemble).resolve())
    if args.trace != str(SEED / "jobs.jsonl"):
        args.trace = str(Path(args.trace).resolve())
    os.chdir(ROOT)
    problem = browser_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        page = report or Path(tmp) / "report.html"
        if report is None:
            code = ensemble(["simulate", args.ensemble, "--trace", args.trace, "--report", str(page)])
            if code != 0:
                return code
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(page, out)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
