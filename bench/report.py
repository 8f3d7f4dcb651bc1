"""Report benchmark: the HTML report of a 10,000-job run — its size, the time to make it and the time a real
Chromium takes to draw it. Prints each figure beside its baseline and writes bench/results/report.json.

Run from the repository root: ``.venv/bin/python bench/report.py``. Every figure and its baseline are
measured in the same run, on one simulated ensemble (``ensemble simulate``'s code, demand-fit, 10 s checks,
100 s provisioning, maxSize 64) of 10,000 jobs of 1, 2 and 4 nodes with run times of 30–300 s:

* ``report_bytes`` — the size of the page; baseline: ``jobs.jsonl``-style JSON Lines of the same attempts
  (what a results folder keeps of them).
* ``report_seconds`` — the time from the finished simulation to the page written (view, page, file), best
  of 3; baseline: the simulation itself.
* ``draw_seconds`` — Debian's Chromium (Playwright, headless) from opening the file to every chart drawn,
  best of 3; baseline: the same for the 1,000-job run of the same ensemble. Skipped, saying why, without
  Chromium or the playwright package.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_cli import report, runview  # noqa: E402
from ensemble_cli.simulation import SimulationConfig, SimulationResult, simulate  # noqa: E402
from ensemble_core.spec import load  # noqa: E402
from tests.browser_support import CHROMIUM, browser_problem  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "report.json"


def ensemble_text(jobs: int) -> str:
    groups = []
    per = jobs // 6
    for i, (nodes, duration) in enumerate([(1, 30), (1, 120), (2, 60), (2, 300), (4, 90), (4, 200)]):
        count = per if i < 5 else jobs - 5 * per
        groups.append(f"      - {{name: g{i}, command: 'true', nodes: {nodes}, count: {count}, duration: {duration}}}")
    return (
        "apiVersion: ensemble.flux-framework.org/v1alpha1\nkind: Ensemble\nmetadata: {name: bench}\nspec:\n"
        "  members:\n  - minicluster: {spec: {size: 1, maxSize: 64}}\n    jobs:\n" + "\n".join(groups) + "\n"
    )


def run(jobs: int, folder: Path) -> tuple[SimulationResult, float]:
    file = folder / f"bench-{jobs}.yaml"
    file.write_text(ensemble_text(jobs))
    config = SimulationConfig(ensemble=load(file), record=True)
    started = time.perf_counter()
    result = simulate(config)
    return result, time.perf_counter() - started


def write_report(result: SimulationResult, path: Path) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        report.write(runview.from_simulation(result, result.summary(), "bench"), path)
        best = min(best, time.perf_counter() - started)
    return best


def draw_seconds(path: Path) -> float:
    from playwright.sync_api import sync_playwright

    best = float("inf")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            for _ in range(3):
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.on("pageerror", lambda error: errors.append(str(error)))
                started = time.perf_counter()
                page.goto(path.as_uri())
                page.wait_for_selector("body[data-drawn=true]", timeout=60_000)
                best = min(best, time.perf_counter() - started)
                if errors:
                    raise SystemExit(f"the page failed to draw: {errors}")
                page.close()
        finally:
            browser.close()
    return best


def main() -> None:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        big, simulated = run(10_000, Path(tmp))
        small, _ = run(1_000, Path(tmp))
        attempts = sum(len(jobs) for jobs in big.jobs.values())
        page = Path(tmp) / "10000.html"
        made = write_report(big, page)
        rows = "".join(
            json.dumps({"member": m, "group": j.group, "index": j.index, "attempt": j.attempt, "result": j.result,
                        "nodes": j.nodes, "submit": j.t_submit, "start": j.t_run, "end": j.t_inactive}) + "\n"
            for m, jobs in big.jobs.items() for j in jobs
        )  # fmt: skip
        figures["attempts"] = {"value": attempts, "unit": "attempts"}
        figures["report_bytes"] = {
            "value": page.stat().st_size, "unit": "bytes", "baseline": len(rows.encode()),
            "baseline_is": "the same attempts as JSON Lines (member, group, index, attempt, result, nodes, times)",
        }  # fmt: skip
        figures["report_seconds"] = {
            "value": round(made, 3), "unit": "s", "baseline": round(simulated, 3),
            "baseline_is": "the simulation of the run itself",
        }  # fmt: skip
        problem = browser_problem()
        if problem is None:
            small_page = Path(tmp) / "1000.html"
            write_report(small, small_page)
            figures["draw_seconds"] = {
                "value": round(draw_seconds(page), 3), "unit": "s", "baseline": round(draw_seconds(small_page), 3),
                "baseline_is": "the same for the 1,000-job run",
            }  # fmt: skip
        else:
            figures["draw_seconds"] = {"skipped": problem}
    for name, figure in figures.items():
        if "skipped" in figure:
            print(f"{name}: skipped: {figure['skipped']}")
        elif "baseline" in figure:
            print(
                f"{name}: {figure['value']} {figure['unit']} (baseline {figure['baseline']}: {figure['baseline_is']})"
            )
        else:
            print(f"{name}: {figure['value']} {figure['unit']}")
    RESULTS.write_text(
        json.dumps(
            {"machine": {"python": platform.python_version(), "platform": platform.platform()},
             "time": time.time(), "figures": figures},
            indent=2,
        ) + "\n"
    )  # fmt: skip
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
