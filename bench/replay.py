"""How well the model of the original reproduces its recorded runs: replay agreement and simulation fidelity.

Usage: .venv/bin/python bench/replay.py [--shared ../shared] [--json bench/results/replay.json]
                                        [--before DIR]

For each recorded GKE run of the original (``shared/data/seed-gke``):

- **replay agreement**: ``ensemble replay RECORDING --algorithm seed-as-built --option scaleChecks=5
  --option terminateChecks=2 --compare`` — recorded decisions, how many agree, and the disagreements
  by cause (also for ``workload-demand``, the original's algorithm as it was meant);
- **simulation fidelity**: ``seed-as-built`` simulated in closed loop on the run's trace and options
  with the 100 s provisioning delay; its makespan against the recorded one (the target: within 20 %).

``--before DIR`` runs the same measurement on another source tree (e.g. an export of ``main``) in a
subprocess, in the same run, and prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TREE = Path(os.environ.get("ENSEMBLE_TREE", str(REPO)))
sys.path.insert(0, str(TREE))

from ensemble_cli import replay as replay_cli  # noqa: E402
from ensemble_cli.simulation import SimulationConfig, simulate  # noqa: E402
from ensemble_core import algorithms  # noqa: E402
from ensemble_core.spec import load  # noqa: E402
from sidecar.sim import load_trace  # noqa: E402

RUNS = ("run5-ascending", "run5-descending", "run5-random")
#: Makespan of each run, first submit to last job done (shared/data/seed-gke/README.md).
RECORDED_MAKESPAN = {"run5-random": 196.0, "run5-ascending": 213.0, "run5-descending": 188.0}
OPTIONS = [("scaleChecks", "5"), ("terminateChecks", "2")]
DELAY = 100.0


def agreement(recording: Path, algorithm: str) -> dict[str, Any]:
    args = argparse.Namespace(recording=str(recording), algorithm=algorithm, option=OPTIONS, ensemble=None)
    notes: list[str] = []
    recorded, decisions = replay_cli.replay(args, notes)
    summary = replay_cli.summarise(replay_cli.compare(decisions, recorded))
    return {
        "recorded": summary.recorded,
        "replayed": summary.replayed,
        "agree": summary.agree,
        "causes": dict(getattr(summary, "causes", {})),
    }


def fidelity(folder: Path, run: str) -> dict[str, Any]:
    ensemble = load(folder / "ensemble.yaml")
    accepted = algorithms.option_names("seed-as-built")
    options = {k: v for k, v in ensemble.members[0].algorithm.options.items() if k in accepted}
    config = SimulationConfig(
        ensemble=ensemble,
        algorithm="seed-as-built",
        options=options,
        trace=load_trace(folder / "jobs.jsonl"),
        delay=DELAY,
    )
    summary = simulate(config).summary()
    recorded = RECORDED_MAKESPAN[run]
    return {
        "makespan_s": summary["makespan_s"],
        "recorded_makespan_s": recorded,
        "error_pct": round(100 * (summary["makespan_s"] - recorded) / recorded, 1),
        "scale_ups": summary["scale_ups"],
    }


def measure(shared: Path) -> dict[str, Any]:
    rows = []
    for run in RUNS:
        folder = shared / "data/seed-gke" / run
        rows.append(
            {
                "run": run,
                "seed-as-built": agreement(folder / "recording.jsonl", "seed-as-built"),
                "workload-demand": agreement(folder / "recording.jsonl", "workload-demand"),
                "simulation": fidelity(folder, run),
            }
        )
    return {"tree": str(TREE), "rows": rows}


def show(label: str, result: dict[str, Any]) -> None:
    print(f"## {label} ({result['tree']})")
    total = agreed = 0
    for row in result["rows"]:
        seed, wd, sim = row["seed-as-built"], row["workload-demand"], row["simulation"]
        total += seed["recorded"]
        agreed += seed["agree"]
        print(
            f"{row['run']:16} seed-as-built agrees on {seed['agree']}/{seed['recorded']} {seed['causes'] or ''}; "
            f"workload-demand {wd['agree']}/{wd['recorded']}; simulated makespan {sim['makespan_s']:.1f} s vs "
            f"{sim['recorded_makespan_s']:.0f} s recorded ({sim['error_pct']:+.1f} %)"
        )
    worst = max(abs(row["simulation"]["error_pct"]) for row in result["rows"])
    print(f"seed-as-built: {agreed} of {total} recorded decisions ({100 * agreed / total:.0f} %); "
          f"worst makespan error {worst:.1f} %")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--json", default=str(REPO / "bench/results/replay.json"))
    parser.add_argument("--before", metavar="DIR", help="also measure this source tree (in a subprocess)")
    parser.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    after = measure(Path(args.shared))
    if args.emit:
        print(json.dumps(after))
        return 0
    report: dict[str, Any] = {"python": platform.python_version(), "after": after}
    if args.before:
        env = {**os.environ, "ENSEMBLE_TREE": str(Path(args.before).resolve())}
        out = subprocess.run(
            [sys.executable, __file__, "--shared", args.shared, "--emit"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        report["before"] = json.loads(out.stdout)
        show("before", report["before"])
    show("after", after)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
