"""The run report in a real headless Chromium (Playwright): it opens offline with no console error, its charts
are drawn, and a decision's reason shows on hover."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_cli.main import main
from tests.browser_support import CHROMIUM, browser_problem
from tests.test_report import SEED, page_json, seed_trace

pytestmark = pytest.mark.skipif(browser_problem() is not None, reason=str(browser_problem()))

#: Colours of the Gantt chart's bars (report.js's RESULT_COLORS) for succeeded and failed attempts.
SUCCEEDED, FAILED = (0x4C, 0x9B, 0xE8), (0xD6, 0x27, 0x28)


def two_member_report(tmp_path: Path) -> Path:
    """A simulation of two members on the seed trace (one failed job each), with the recorded run overlaid."""
    document = yaml.safe_load((SEED / "ensemble.yaml").read_text())
    document["spec"]["members"].append(json.loads(json.dumps(document["spec"]["members"][0])))
    ensemble = tmp_path / "two.yaml"
    ensemble.write_text(yaml.safe_dump(document))
    page = tmp_path / "report.html"
    code = main(["simulate", str(ensemble), "--trace", str(seed_trace(tmp_path)), "--json", "--report", str(page)])
    assert code == 0
    return page


def count_pixels(page: Any, selector: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of a canvas of this colour (within a small tolerance)."""
    return int(
        page.evaluate(
            """([selector, rgb]) => {
                const canvas = document.querySelector(selector);
                const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                let n = 0;
                for (let i = 0; i < pixels.length; i += 4) {
                    if (Math.abs(pixels[i] - rgb[0]) < 8 && Math.abs(pixels[i + 1] - rgb[1]) < 8 &&
                        Math.abs(pixels[i + 2] - rgb[2]) < 8) n++;
                }
                return n;
            }""",
            [selector, list(rgb)],
        )
    )


def test_report_opens_offline_draws_its_charts_and_shows_a_reason_on_hover(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    path = two_member_report(tmp_path)
    data = page_json(path.read_text())
    errors: list[str] = []
    fetched: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})

            def only_the_file(route: Any) -> None:
                if route.request.url.startswith("file://"):
                    route.continue_()
                else:
                    fetched.append(route.request.url)
                    route.abort()

            context.route("**/*", only_the_file)
            page = context.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-drawn=true]", timeout=10_000)
            assert errors == [] and fetched == []

            # per member: the four series and the four of the recorded run, each a real line, and every decision
            for member in data["members"]:
                chart = f'svg.timeline[data-member="{member["index"]}"]'
                lengths = page.eval_on_selector_all(
                    f"{chart} path.series", "paths => paths.map(p => p.getTotalLength())"
                )
                assert len(lengths) == 8 and all(length > 50 for length in lengths), lengths
                assert page.locator(f"{chart} path.recorded").count() == 4
                assert page.locator(f"{chart} .decision").count() == len(member["decisions"])
            # the Gantt charts: bars of succeeded attempts and the failed one's, in the colours of their results
            for index in (0, 1):
                canvas = f'canvas.gantt[data-member="{index}"]'
                assert page.get_attribute(canvas, "data-attempts") == "12"
                assert count_pixels(page, canvas, SUCCEEDED) > 500
                assert count_pixels(page, canvas, FAILED) > 20
            figures = page.locator("#figures .figure")
            assert figures.count() == len(data["figures"]) and "makespan" in figures.first.inner_text()
            assert "terminateChecks=2" in page.locator("#algorithms").inner_text()

            # hovering a scale decision shows its reason and what became of it
            decisions = data["members"][0]["decisions"]
            k, decision = next((k, d) for k, d in enumerate(decisions) if d[1] == "scale")
            assert not page.locator("#tip").is_visible()
            page.hover(f'svg.timeline[data-member="0"] .decision[data-index="{k}"]')
            tip = page.locator("#tip")
            assert tip.is_visible()
            assert decision[3] in tip.inner_text() and decision[4] in tip.inner_text()
            page.mouse.move(1, 1)
            assert not tip.is_visible()

            # hovering a bar of the Gantt chart names its attempt: sweep along the top band (the 8-node jobs)
            gantt = page.locator('canvas.gantt[data-member="0"]')
            gantt.scroll_into_view_if_needed()
            box = gantt.bounding_box()
            assert box is not None
            shown = ""
            for step in range(0, int(box["width"]), 3):
                page.mouse.move(box["x"] + step, box["y"] + 10)
                if tip.is_visible():
                    shown = tip.inner_text()
                    break
            assert re.search(r"lmp-8\[\d+\] attempt 1: succeeded\s+8 nodes, submitted", shown), shown

            # the failed attempts, their output behind a click
            assert page.locator("#failures details").count() == 2
            page.click("#failures details >> nth=0 >> summary")
            assert page.locator("#failures details >> nth=0 >> pre").is_visible()

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 30_000
            assert errors == []
        finally:
            browser.close()
