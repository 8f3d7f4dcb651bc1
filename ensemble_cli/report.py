"""``ensemble report RECORDING|RESULTS_DIR -o report.html``: one self-contained HTML page of a run.

The page holds its data (compact arrays: a 10,000-job run stays well under a megabyte), its style and
the script that draws it, and loads nothing else, so it opens offline from a file or a mail. Per
member: requested size, nodes up, jobs waiting and running over time with each decision marked (its
reason and what became of it on hover), and a Gantt chart of the job attempts by node count; for the
run: the summary figures, the algorithm and options of each member, the attempts that did not succeed
with the end of their output and, for a simulation on a recorded trace, the recorded run overlaid.

``ensemble up`` writes ``report.html`` into its results folder (with the ``recording.jsonl`` of the
run's metrics, decisions and applied events, and the Ensemble file as ``ensemble.yaml``, from which
``ensemble report RESULTS_DIR`` makes the same page again); ``ensemble simulate --report FILE``
writes one of the simulated run. See :mod:`ensemble_cli.runview` for what is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from ensemble_cli import runview
from ensemble_cli.runview import RunView, RunViewError
from ensemble_core.messages import Applied, Decision, Metrics, decode, encode

#: The order of results in the page's compact arrays (an attempt's ``r`` is an index into it).
RESULTS = ("succeeded", "failed", "lost", "cancelled", "unfinished")
REPORT_NAME = "report.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble report``."""
    parser.add_argument(
        "source",
        help="a recording (`ensemble record`, `simulate --record`) or a results folder of `ensemble up`",
    )
    parser.add_argument("-o", "--output", required=True, metavar="HTML", help="write the report to this file")
    parser.add_argument(
        "--ensemble",
        metavar="FILE",
        help="the Ensemble file of the run, for the algorithms and options (default: ensemble.yaml beside "
        "the recording or in the results folder)",
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def page_data(view: RunView) -> dict[str, Any]:
    """The JSON the page draws from: series and attempts as parallel arrays, times to a tenth of a second."""
    members = []
    for member in view.members:
        groups: dict[str, int] = {}
        jobs: dict[str, list[Any]] = {key: [] for key in ("g", "i", "a", "n", "q", "s", "e", "r")}
        for a in member.attempts:
            jobs["g"].append(groups.setdefault(a.group, len(groups)))
            jobs["i"].append(a.index)
            jobs["a"].append(a.attempt)
            jobs["n"].append(a.nodes)
            jobs["q"].append(_round(a.submit))
            jobs["s"].append(_round(a.start))
            jobs["e"].append(_round(a.end))
            jobs["r"].append(RESULTS.index(a.result) if a.result in RESULTS else RESULTS.index("unfinished"))

        def series(s: runview.Series) -> dict[str, list[Any]]:
            return {"t": [round(t, 1) for t in s.t], "size": s.size, "up": s.up, "waiting": s.waiting,
                    "running": s.running}  # fmt: skip

        members.append(
            {
                "index": member.index,
                "algorithm": member.algorithm,
                "options": member.options,
                "series": series(member.series),
                "recorded": series(member.recorded) if member.recorded is not None else None,
                "decisions": [[round(d.t, 1), d.action, d.size, d.reason, d.outcome] for d in member.decisions],
                "jobs": {"groups": list(groups), **jobs},
            }
        )
    return {
        "title": view.title,
        "source": view.source,
        "notes": view.notes,
        "recorded_from": view.recorded_from,
        "figures": [[key, value] for key, value in view.figures.items() if value is not None],
        "member_figures": view.member_figures,
        "members": members,
        "results": list(RESULTS),
        "failures": [dataclasses.asdict(f) for f in view.failures],
        "failures_total": view.failures_total,
    }


def render(view: RunView) -> str:
    """The report page: one HTML document with its data, style and script inline."""
    assets = resources.files("ensemble_cli") / "data"
    script = (assets / "report.js").read_text(encoding="utf-8")
    style = (assets / "report.css").read_text(encoding="utf-8")
    # inside <script>, "</" could end the element early: JSON may spell "<" as \u003c
    data = json.dumps(page_data(view), separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(view.title)} — ensemble run report</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{style}</style></head><body>"
        '<main id="report"></main><div id="tip" role="tooltip"></div>'
        f'<script type="application/json" id="run-data">{data}</script>'
        f"<script>{script}</script></body></html>\n"
    )


def write(view: RunView, path: Path) -> None:
    """Write the report page of ``view`` to ``path``."""
    path.write_text(render(view), encoding="utf-8")


def view_of(source: Path, ensemble_file: Path | None = None) -> RunView:
    """The view of a results folder or a recording; raises :class:`RunViewError` saying which it expected."""
    if source.is_dir():
        return runview.from_results(source, ensemble_file)
    if not source.is_file():
        raise RunViewError(f"{source}: no such file or folder (give a recording or a results folder of `ensemble up`)")
    return runview.from_recording(source, ensemble_file)


def run(args: argparse.Namespace) -> int:
    """Run ``ensemble report``: 0 when written, 2 when the source or the output cannot be used."""
    try:
        view = view_of(Path(args.source), Path(args.ensemble) if args.ensemble else None)
        write(view, Path(args.output))
    except RunViewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: -o {args.output}: cannot write the report: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"report of {args.source} written to {args.output}")
    return 0


class Collector:
    """Keeps the metrics, decisions and applied events of one ensemble seen on NATS (a core subscription
    of ``ensemble up``), to write them beside its results."""

    def __init__(self, namespace: str, ensemble: str) -> None:
        self.namespace = namespace
        self.ensemble = ensemble
        self.records: list[Metrics | Decision | Applied] = []

    async def on_message(self, msg: Msg) -> None:
        """The subscription's callback: a message of another kind or ensemble, or one that does not decode, is
        left out."""
        kinds: dict[str, type[Metrics] | type[Decision] | type[Applied]] = {
            "metrics": Metrics, "decisions": Decision, "applied": Applied,
        }  # fmt: skip
        parts = msg.subject.split(".")
        kind = kinds.get(parts[1]) if len(parts) > 1 else None
        if kind is None:
            return
        try:
            message = decode(msg.data, kind)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if message.namespace == self.namespace and message.ensemble == self.ensemble:
            self.records.append(message)


def write_for_up(folder: Path, ensemble_file: str, collector: Collector) -> Path | None:
    """After ``ensemble up``: write the run's recording, a copy of its Ensemble file and ``report.html`` into
    the results folder; returns the report's path, or None (saying why on stderr) when it could not be made
    — the results themselves are written already."""
    try:
        records = sorted(collector.records, key=lambda r: r.time)
        (folder / runview.RESULTS_RECORDING).write_bytes(b"".join(encode(r) + b"\n" for r in records))
        copy = folder / runview.RESULTS_ENSEMBLE
        if not (copy.exists() and copy.samefile(ensemble_file)):
            shutil.copyfile(ensemble_file, copy)
        path = folder / REPORT_NAME
        write(runview.from_results(folder), path)
    except (OSError, RunViewError) as exc:
        print(f"warning: no report of the run: {exc}", file=sys.stderr)
        return None
    return path
