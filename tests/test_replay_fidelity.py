"""The model of the original agrees with its recorded decisions: one test per cause of disagreement found.

Issue 18. Causes, each fixed and tested here (docs/replay.md, "The original on its own recordings"):

- the model counted the original's re-checks twice: the recordings hold them as metrics lines of
  their own, and the model also credited them (model);
- a step above maxSize was dropped inside the model, so the recorded (ignored) decision had no
  counterpart (model: it is now decided as ``scale-ignored``, which no actuator applies, and replay
  pairs it with the recorded scale that did not apply);
- re-checks share one time but not one seq, so agreement also allows the recordings' ±1.5 s (matching);
- ``--algorithm seed-as-built`` ran without the file's options (the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ensemble_cli import replay as replay_cli
from ensemble_cli.main import main
from ensemble_cli.simulation import SimulationConfig, simulate
from ensemble_core import algorithms
from ensemble_core.algorithms.baselines import IGNORED_SCALE
from ensemble_core.messages import DEFAULT_ALGORITHM, Applied, Decision, Metrics
from ensemble_core.spec import load
from sidecar.sim import load_trace
from tests.conftest import REPO, SHARED
from tests.factories import make_member, make_metrics

SEED = SHARED / "data" / "seed-gke"
RUNS = ("run5-ascending", "run5-descending", "run5-random")
WAITING = {2: 3, 4: 3, 6: 3, 8: 3}


def replay_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[list[dict[str, Any]], str]:
    assert main(["replay", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize("run", RUNS)
def test_the_model_of_the_original_repeats_every_recorded_decision_at_its_seq(
    run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = str(SEED / run / "recording.jsonl")
    argv = [recording, "--compare", "--algorithm", "seed-as-built"]
    lines, _ = replay_json(capsys, *argv, "--option", "scaleChecks=5", "--option", "terminateChecks=2")
    summary, pairs = lines[-1], lines[:-1]
    assert summary["agree"] == summary["recorded"] > 0
    # the only decision left alone is the submission, which the recording does not hold
    assert summary["causes"] == {"submit-not-recorded": 1}
    for pair in pairs:
        if pair["recorded"] is not None:
            assert pair["replayed"]["based_on"] == pair["recorded"]["based_on"], pair
            assert pair["replayed"]["size"] == pair["recorded"]["size"], pair
    # the steps the original ignored are decided with their size above maxSize, as recorded
    dropped = [p for p in pairs if p["outcome"].startswith("failed")]
    assert dropped and all(p["replayed"]["action"] == IGNORED_SCALE and p["replayed"]["size"] > 24 for p in dropped)
    # without --option the file's options are kept (seed-as-built takes workload-demand's): the same result
    again, notes = replay_json(capsys, recording, "--compare", "--algorithm", "seed-as-built")
    assert again == lines
    assert "dropped" not in notes


def seed_decisions(stream: list[Metrics], max_size: int = 24) -> list[Decision]:
    member = make_member("seed-as-built", max_size=max_size)
    options = algorithms.parse_options("seed-as-built", {"scaleChecks": 5, "terminateChecks": 2})
    return replay_cli.replay_member(member, algorithms.get("seed-as-built"), options, stream)


def waiting_stream(times: list[float], sizes: dict[int, int], next_job: int = 4) -> list[Metrics]:
    """Snapshots at ``times`` with every job still waiting; ``sizes`` gives the size from a seq on."""
    stream = []
    size = 1
    for seq, when in enumerate(times):
        size = sizes.get(seq, size)
        snapshot = make_metrics(seq, size=size, up=1, free=1, waiting=WAITING, next_jobs=[next_job])
        stream.append(msgspec.structs.replace(snapshot, time=when))
    return stream


def test_re_checks_in_the_stream_are_the_ones_the_model_owes_not_extra_checks() -> None:
    # A recording: submission at t=0, then a check every 10 s; after the step at seq 3 (t=30) the
    # original called twice more at once (seq 4 and 5 at t=30). Its next step came 3 periodic checks later.
    times = [0.0, 10.0, 20.0, 30.0, 30.0, 30.0, 40.0, 50.0, 60.0, 70.0]
    decisions = seed_decisions(waiting_stream(times, {4: 5}))
    scales = [(d.based_on, d.time, d.size) for d in decisions if d.action == "scale"]
    assert scales == [(3, 30.0, 5), (8, 60.0, 9)]  # counted twice, the second came at seq 6 (t=40)
    # A simulation or a live poller makes no re-check snapshots: the model adds them, same cadence
    periodic = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
    decisions = seed_decisions(waiting_stream(periodic, {4: 5}))
    assert [(d.time, d.size) for d in decisions if d.action == "scale"] == [(30.0, 5), (60.0, 9)]


def test_a_step_above_max_size_is_decided_then_ignored_and_the_counter_restarts_without_re_checks() -> None:
    times = [10.0 * seq for seq in range(12)]
    decisions = seed_decisions(waiting_stream(times, {}, next_job=8), max_size=6)
    assert {d.action for d in decisions} == {"submit", IGNORED_SCALE}
    scales = [(d.based_on, d.size) for d in decisions if d.action == IGNORED_SCALE]
    # 1 + 8 > 6 at seq 3; the original reset its counter before checking the size and made no
    # re-check (nothing changed), so the next try is 5 periodic calls later
    assert scales == [(3, 9), (8, 9)]
    assert "outside maxSize 6, so the original ignored it" in decisions[1].reason


def test_an_ignored_step_is_not_applied_in_a_simulation_as_the_original_did_not() -> None:
    folder = SEED / "run5-descending"
    ensemble = load(folder / "ensemble.yaml")
    config = SimulationConfig(
        ensemble=ensemble, algorithm="seed-as-built", trace=load_trace(folder / "jobs.jsonl"), delay=100, record=True
    )
    result = simulate(config)
    above = {r.id for r in result.records if isinstance(r, Decision) and r.action == IGNORED_SCALE}
    assert above, "the descending run passes maxSize 24 (17 + 8), as recorded"
    refused = [r for r in result.records if isinstance(r, Applied) and r.decision in above]
    assert len(refused) == len(above) and not any(r.ok for r in refused)
    summary = result.summary()
    assert summary["peak_size"] <= 24 and summary["scale_downs"] == 0


def decision_at(seq: int, when: float, action: str = "scale", size: int | None = 5, **extra: Any) -> Decision:
    return Decision(
        namespace="default", ensemble="ens", member=0, id=f"d-{seq}-{action}", time=when, based_on=seq,
        action=action, size=size, **extra,
    )  # fmt: skip


def test_decisions_at_one_time_agree_however_many_seqs_apart() -> None:
    # re-checks share the time of the change: 3 seqs apart at the same time is the same moment
    recording = replay_cli.Recording(metrics=[make_metrics(0)], decisions=[decision_at(3, 1030.0)])
    pairs = replay_cli.compare([decision_at(6, 1030.5)], recording)
    assert [p.agree for p in pairs] == [True]
    pairs = replay_cli.compare([decision_at(6, 1060.0)], recording)
    assert [(p.agree, p.cause) for p in pairs] == [(False, "timing")]
    assert "3 metrics later (+30.0 s)" in pairs[0].detail


def test_an_ignored_step_agrees_only_with_a_recorded_scale_that_did_not_apply() -> None:
    recorded = decision_at(13, 1130.0, size=25)
    failed = Applied(namespace="default", ensemble="ens", member=0, decision=recorded.id, time=1130.0, ok=False,
                     error="original operator: ignored 17->25 outside boundary")  # fmt: skip
    ignored = decision_at(13, 1130.0, action=IGNORED_SCALE, size=25)
    recording = replay_cli.Recording(metrics=[make_metrics(0)], decisions=[recorded], applied={recorded.id: failed})
    assert [p.agree for p in replay_cli.compare([ignored], recording)] == [True]
    applied = msgspec.structs.replace(failed, ok=True, error="")
    recording = replay_cli.Recording(metrics=[make_metrics(0)], decisions=[recorded], applied={recorded.id: applied})
    assert [p.agree for p in replay_cli.compare([ignored], recording)] == [False, False]


def test_each_disagreement_gets_its_cause_and_the_summary_counts_them(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = [
        make_metrics(0, size=1, free=1, waiting={2: 1}, next_jobs=[2]),
        make_metrics(10, size=4, up=1, free=1, waiting={2: 1}, next_jobs=[2]),  # 1 free + 3 coming
    ]
    recorded = [
        decision_at(2, 1020.0, size=9),  # replayed at seq 3 with another size
        decision_at(10, 1100.0, size=6),  # not needed: the next job (2) fits in 1 free + 3 coming
        decision_at(20, 1200.0, size=30),  # ignored by the original
        decision_at(30, 1300.0, action="terminate", size=None),  # nothing replayed: no known cause
    ]
    applied = {"d-20-scale": Applied(namespace="default", ensemble="ens", member=0, decision="d-20-scale",
                                     time=1200.0, ok=False, error="ignored 17->30 outside boundary")}  # fmt: skip
    recording = replay_cli.Recording(metrics=metrics, decisions=recorded, applied=applied)
    replayed = [decision_at(0, 1000.0, action="submit", size=None), decision_at(3, 1030.0, size=7)]
    pairs = replay_cli.compare(replayed, recording)
    causes = {
        (p.recorded.based_on if p.recorded else p.replayed.based_on if p.replayed else -1): p.cause for p in pairs
    }
    assert causes == {0: "submit-not-recorded", 2: "size", 10: "not-needed", 20: "not-applied", 30: ""}
    by_seq = {p.recorded.based_on: p for p in pairs if p.recorded}
    assert "next waiting job needs 2 nodes and 1 are free + 3 requested" in by_seq[10].detail
    assert "size 7 where the recording asks for 9" in by_seq[2].detail
    summary = replay_cli.summarise(pairs)
    assert (summary.recorded, summary.replayed, summary.agree) == (4, 2, 0)
    assert summary.causes == {"not-applied": 1, "not-needed": 1, "size": 1, "submit-not-recorded": 1, "unexplained": 1}


def test_the_table_names_the_causes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(SEED / "run5-descending" / "recording.jsonl"), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "disagreements by cause: not-needed 3, submit-not-recorded 1, unexplained 1" in out


def test_a_rules_ensemble_replays_with_its_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = REPO / "examples" / "rules.yaml"
    result = simulate(SimulationConfig(ensemble=load(example), delay=5, record=True))
    recording = tmp_path / "rules.jsonl"
    recording.write_bytes(b"".join(msgspec.json.encode(record) + b"\n" for record in result.records))
    lines, _ = replay_json(capsys, str(recording), "--ensemble", str(example), "--compare")
    summary = lines[-1]
    assert summary["recorded"] > 3 and summary["agree"] == summary["recorded"] == summary["replayed"]


def test_replay_under_another_algorithm_keeps_the_options_it_takes_and_names_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recording = str(SEED / "run5-ascending" / "recording.jsonl")
    decisions, notes = replay_json(capsys, recording, "--algorithm", "static")
    assert "static does not take the file's workload-demand option(s) scaleChecks: dropped" in notes
    assert decisions[0]["order"] == "ascending"  # order: kept
    # terminateChecks: 2 kept (the default, 1, would end at the first idle check, seq 32)
    assert [d["based_on"] for d in decisions if d["action"] == "terminate"] == [33]


def test_without_an_ensemble_file_the_member_falls_back_to_the_default_algorithm_as_the_docs_say() -> None:
    recording = replay_cli.read_recording(SEED / "run5-random" / "recording.jsonl")
    spec, notes = replay_cli.member_from_recording(recording, replay_cli.addresses(recording)[0])
    assert spec.algorithm.name == DEFAULT_ALGORITHM
    assert f"so {DEFAULT_ALGORITHM} with defaults" in notes[0]
    docs = (REPO / "docs" / "replay.md").read_text()
    assert f"the algorithm `{DEFAULT_ALGORITHM}` with its defaults" in docs


def test_a_simulated_run_of_the_model_replays_to_the_same_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no re-check snapshots in a simulation: the model adds the ones it owes, and replay agrees with it
    folder = SEED / "run5-descending"
    config = SimulationConfig(
        ensemble=load(folder / "ensemble.yaml"), algorithm="seed-as-built", trace=load_trace(folder / "jobs.jsonl"),
        delay=100, record=True,
    )  # fmt: skip
    recording = tmp_path / "simulated.jsonl"
    recording.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in simulate(config).records))
    argv = [str(recording), "--ensemble", str(folder / "ensemble.yaml"), "--algorithm", "seed-as-built", "--compare"]
    lines, _ = replay_json(capsys, *argv)
    summary = lines[-1]
    assert summary["agree"] == summary["recorded"] == summary["replayed"] >= 4
    assert summary["causes"] == {}
