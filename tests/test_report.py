"""The run report (`ensemble report`, `simulate --report`, `ensemble up`'s report.html) and `simulate --plot`.

What the page draws is checked here through the data it carries; tests/test_report_browser.py opens it in
a real Chromium.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_cli import plot, report, runview
from ensemble_cli.main import main
from tests.conftest import SHARED

SEED = SHARED / "data/seed-gke/run5-ascending"


def page_json(html: str) -> dict[str, Any]:
    """The data a report page draws from."""
    found = re.search(r'<script type="application/json" id="run-data">(.*?)</script>', html, re.S)
    assert found is not None, "the page carries no run data"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def seed_trace(tmp_path: Path) -> Path:
    """The ascending seed run's trace with its third job failed, and its recording beside it."""
    lines = (SEED / "jobs.jsonl").read_text().splitlines()
    third = json.loads(lines[2])
    third["success"] = False
    lines[2] = json.dumps(third)
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(SEED / "recording.jsonl", folder / "recording.jsonl")
    return folder / "jobs.jsonl"


def simulate(tmp_path: Path, *extra: str) -> int:
    trace = seed_trace(tmp_path)
    return main(["simulate", str(SEED / "ensemble.yaml"), "--trace", str(trace), "--json", *extra])


def test_simulate_report_holds_the_run_and_the_recorded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "run.html"
    assert simulate(tmp_path, "--report", str(page)) == 0
    summary = json.loads(capsys.readouterr().out)
    data = page_json(page.read_text())
    figures = dict(data["figures"])
    assert figures["makespan_s"] == summary["makespan_s"] and figures["node_seconds"] == summary["node_seconds"]
    assert figures["recorded_makespan_s"] == pytest.approx(213.5, abs=0.5)  # shared/data/seed-gke/README.md
    (member,) = data["members"]
    assert member["algorithm"] == "workload-demand" and member["options"]["terminateChecks"] == 2
    assert len(member["jobs"]["n"]) == 12 and sorted(set(member["jobs"]["n"])) == [2, 4, 6, 8]
    assert sum(1 for r in member["jobs"]["r"] if data["results"][r] == "failed") == 1
    (failure,) = data["failures"]
    assert failure["result"] == "failed" and failure["group"] == "lmp-2"
    scales = [d for d in member["decisions"] if d[1] == "scale"]
    assert scales and all(d[3] and d[4].startswith("applied") for d in scales)  # a reason and an outcome each
    # the recorded run: its sizes from the recording beside the trace (1 → 23), its jobs from the trace
    recorded = member["recorded"]
    assert max(recorded["size"]) == 23 and max(recorded["waiting"]) == 12 and recorded["running"][-1] == 0
    assert len(recorded["t"]) == len(recorded["size"]) == len(recorded["waiting"])
    assert "recording.jsonl" in data["recorded_from"]
    # each series is a step series: no sample repeats the one before it
    series = member["series"]
    steps = list(zip(series["size"], series["up"], series["waiting"], series["running"], strict=True))
    assert all(a != b for a, b in itertools.pairwise(steps))


def results_folder(tmp_path: Path) -> Path:
    """A results folder as `ensemble up` leaves it: one failed attempt whose output names a file that is not
    where it was (the run was elsewhere), a reason with markup in it, and the recording and Ensemble file."""
    folder = tmp_path / "results"
    out = folder / "outputs" / "member-0" / "sim"
    out.mkdir(parents=True)
    (out / "1.1.out").write_text("step 1\n" + "x" * 3000 + "\nsegfault </script><script>alert(1)</script>\n")
    (out / "1.1.err").write_text("disk full\n")
    t0 = 1_700_000_000.0
    rows = [
        {"member": 0, "group": "sim", "index": 0, "attempt": 1, "result": "succeeded", "exit_code": 0, "nodes": 2,
         "submit": t0 + 1, "start": t0 + 2, "end": t0 + 12, "reason": "", "params": {}, "command": "true",
         "stdout": "elsewhere/0.1.out", "stderr": ""},
        {"member": 0, "group": "sim", "index": 1, "attempt": 1, "result": "failed", "exit_code": 3, "nodes": 1,
         "submit": t0 + 1, "start": t0 + 3, "end": t0 + 5, "reason": "<img src=x onerror=alert(1)>", "params": {},
         "command": "false", "stdout": "elsewhere/1.1.out", "stderr": "elsewhere/1.1.err"},
    ]  # fmt: skip
    (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"members": [{"member": 0, "jobs": 2, "node_seconds": 24.0, "scale_ups": 1, "scale_downs": 0,
                            "peak": 2}], "total": {"jobs": 2, "succeeded": 1, "failed": 1}, "seconds": 14.0,
               "completed": True}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    base = {"version": 1, "namespace": "default", "ensemble": "demo", "member": 0}
    nodes = {"node_cores_free": 1, "node_cores_up": 1, "node_up_count": 1, "node_free_count": 1}
    queue = {"new": 0, "depend": 0, "priority": 0, "sched": 2, "run": 0, "cleanup": 0, "inactive": 0}
    records = [
        {"kind": "metrics", **base, "seq": 0, "time": t0, "size": 1, "nodes": nodes, "queue": queue,
         "waiting": {"1": 1, "2": 1}, "next_jobs": [2, 1]},
        {"kind": "decision", **base, "id": "d1", "time": t0 + 0.5, "based_on": 0, "action": "scale", "size": 2,
         "reason": "next job needs 2 nodes, 1 free: grow 1 → 2"},
        {"kind": "applied", **base, "decision": "d1", "time": t0 + 0.6, "ok": True, "action": "scale",
         "size_before": 1, "size_after": 2},
        {"kind": "metrics", **base, "seq": 1, "time": t0 + 10, "size": 2, "nodes": {**nodes, "node_up_count": 2},
         "queue": {**queue, "sched": 0, "run": 1}, "waiting": {}, "next_jobs": []},
    ]  # fmt: skip
    (folder / "recording.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ensemble = {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "metadata": {"name": "demo"},
        "spec": {"members": [{"minicluster": {"spec": {"size": 1, "maxSize": 2}},
                              "algorithm": {"name": "workload-demand", "options": {"scaleChecks": 2}},
                              "jobs": [{"name": "sim", "command": "true", "count": 2}]}]},
    }  # fmt: skip
    (folder / "ensemble.yaml").write_text(yaml.safe_dump(ensemble))
    return folder


def test_report_of_a_results_folder(tmp_path: Path) -> None:
    folder = results_folder(tmp_path)
    view = runview.from_results(folder)
    assert view.title == "default/demo"
    (member,) = view.members
    assert (member.algorithm, member.options) == ("workload-demand", {"scaleChecks": 2})
    assert member.series.t == [0.0, 10.0] and member.series.size == [1, 2] and member.series.waiting == [2, 0]
    (mark,) = member.decisions
    assert (mark.t, mark.size, mark.outcome) == (0.5, 2, "applied: size 1 → 2")
    assert [(a.nodes, a.start, a.end, a.result) for a in member.attempts] == [
        (2, 2.0, 12.0, "succeeded"), (1, 3.0, 5.0, "failed"),
    ]  # fmt: skip
    (failure,) = view.failures
    # the row's paths do not exist from here: the tail is read where the folder keeps the outputs, and cut
    assert failure.exit_code == 3 and failure.tail.endswith("[stderr] disk full")
    assert "segfault" in failure.tail and len(failure.tail) <= runview.TAIL and "step 1" not in failure.tail
    assert view.figures["makespan_s"] == 11.0 and view.figures["job_node_seconds"] == 22.0
    assert view.figures["utilization"] == pytest.approx(22.0 / 24.0, abs=1e-4)


def test_report_page_is_self_contained_and_its_text_cannot_break_out(tmp_path: Path) -> None:
    page = report.render(runview.from_results(results_folder(tmp_path)))
    # nothing loaded from anywhere: two inline scripts, no src, and the only href is the empty data: icon
    assert page.count("<script") == 2 and " src=" not in page.replace("\\u003cimg src=x", "")
    assert re.findall(r'href="([^"]*)"', page) == ["data:,"]
    # (the SVG namespace is a name, not an address: nothing is fetched from it)
    addresses = page.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in addresses and "https://" not in addresses and "url(" not in addresses
    # an output tail or a reason holding markup stays text: it cannot end the data's <script> element
    assert page.count("</script>") == 2 and "<img" not in page
    data = page_json(page)
    assert "</script><script>alert(1)</script>" in data["failures"][0]["tail"]
    assert data["failures"][0]["reason"] == "<img src=x onerror=alert(1)>"


def test_report_command_on_a_results_folder_and_a_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = results_folder(tmp_path)
    assert main(["report", str(folder), "-o", str(tmp_path / "a.html")]) == 0
    assert page_json((tmp_path / "a.html").read_text())["failures"][0]["exit_code"] == 3
    # a recording: ensemble.yaml beside it names the algorithm; it holds no attempts, and the page says so
    assert main(["report", str(SEED / "recording.jsonl"), "-o", str(tmp_path / "b.html")]) == 0
    data = page_json((tmp_path / "b.html").read_text())
    assert data["members"][0]["algorithm"] == "workload-demand" and data["members"][0]["jobs"]["n"] == []
    assert dict(data["figures"])["scale_events"] == 5  # the five applied scale-ups of the ascending run
    assert any("no job attempts" in note for note in data["notes"])
    assert "written to" in capsys.readouterr().out


def test_report_of_a_recording_of_two_ensembles_shows_one_and_says_so(tmp_path: Path) -> None:
    lines = (SEED / "recording.jsonl").read_text().splitlines()
    other = [line.replace('"ensemble": "ensemble-0"', '"ensemble": "other"') for line in lines]
    (tmp_path / "two.jsonl").write_text("\n".join(lines + other) + "\n")
    view = runview.from_recording(tmp_path / "two.jsonl")
    assert view.title == "default/ensemble-0" and len(view.members) == 1
    assert len(view.members[0].decisions) == sum('"kind": "decision"' in line for line in lines)
    assert any("holds 2 ensembles" in note and "not default/other" in note for note in view.notes)


@pytest.mark.parametrize(
    ("source", "output", "message"),
    [
        ("missing", "ok.html", "missing: no such file or folder"),
        ("bad.jsonl", "ok.html", "bad.jsonl:2: "),
        ("empty-dir", "ok.html", "not a results folder of `ensemble up` (it has no jobs.jsonl)"),
        ("good.jsonl", "no-such-dir/x.html", "cannot write the report"),
    ],
)
def test_report_command_refuses_what_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, output: str, message: str
) -> None:
    lines = (SEED / "recording.jsonl").read_text().splitlines()
    (tmp_path / "good.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    (tmp_path / "empty-dir").mkdir()
    code = main(["report", str(tmp_path / source), "-o", str(tmp_path / output)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_plot_has_units_integer_ticks_an_outside_legend_the_figures_and_the_recorded_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ensemble_cli.simulation import SimulationConfig
    from ensemble_cli.simulation import simulate as run_simulation
    from ensemble_core.spec import load
    from sidecar.sim import load_trace

    trace = seed_trace(tmp_path)
    config = SimulationConfig(ensemble=load(SEED / "ensemble.yaml"), trace=load_trace(trace), record=True)
    result = run_simulation(config)
    view = runview.from_simulation(result, result.summary(), "seed", str(trace))
    figure = plot.draw(view, "seed")
    try:
        nodes, jobs = figure.axes[0], figure.axes[1]
        assert "nodes" in nodes.get_ylabel() and jobs.get_ylabel() == "jobs"
        assert "seconds" in nodes.get_xlabel()
        figure.canvas.draw()
        for axis in (nodes, jobs):
            shown = [t for t in axis.get_yticks() if axis.get_ylim()[0] <= t <= axis.get_ylim()[1]]
            assert shown and all(float(t).is_integer() for t in shown), shown
        title = figure._suptitle.get_text()
        assert f"makespan {result.summary()['makespan_s']:.0f} s" in title and "scale events" in title
        assert "recorded makespan 213 s" in title
        # the legend lies beside the panels, over no data
        legend = figure.legends[0].get_window_extent()
        assert all(legend.x0 >= axis.get_window_extent().x1 for axis in figure.axes)
        labels = [text.get_text() for text in figure.legends[0].get_texts()]
        assert {"requested size", "nodes up", "jobs waiting", "jobs running", "recorded requested size",
                "recorded jobs running", "scale decision"} <= set(labels)  # fmt: skip
        dashed = [line for axis in figure.axes for line in axis.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 4  # the recorded size, nodes up, waiting and running
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-dir/run.png", "cannot write the plot: No such file or directory"),
        ("run.xyz", "'.xyz' is not an image format matplotlib writes; end the name with one of"),
        ("run", "no file type is not an image format"),
    ],
)
def test_a_bad_plot_path_is_an_error_after_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    pytest.importorskip("matplotlib")
    code = simulate(tmp_path, "--plot", str(tmp_path / name), "--report", str(tmp_path / "still.html"))
    out, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err
    assert json.loads(out)["jobs"] == 12  # the results were printed first
    assert (tmp_path / "still.html").is_file()  # and the other output was still written
    assert not (tmp_path / name).exists()


def test_plot_writes_the_format_its_name_says(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert simulate(tmp_path, "--plot", str(tmp_path / "run.svg")) == 0
    assert (tmp_path / "run.svg").read_text().lstrip().startswith("<?xml")
