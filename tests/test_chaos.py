"""Restart anything at any time: real ensembles on the local stack while nats-server, each service and
the sidecars are killed (``kill -9``) and started again, a sidecar hangs (SIGSTOP) and one is slow — at
moments drawn from a seed — and the user-visible guarantees still hold.

Each run (one per seed; ``ENSEMBLE_CHAOS_SEEDS=4,5,6`` picks others) injects every fault kind once (see
``tests/chaos.py``), so three runs inject each kind three times. The counted outcomes of the runs made
are written before anything is asserted, failures included: into the test's temporary directory, or to
``ENSEMBLE_CHAOS_REPORT`` when set — ``ENSEMBLE_CHAOS_REPORT=bench/results/chaos.json .venv/bin/pytest
tests/test_chaos.py`` refreshes the committed figures (a plain test run never rewrites them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import chaos
from tests.conftest import REPO

SEEDS = [int(seed) for seed in os.environ.get("ENSEMBLE_CHAOS_SEEDS", "1,2,3").split(",")]
REPORT = os.environ.get("ENSEMBLE_CHAOS_REPORT", "")
#: Seconds a run may take after its last fault for every member to terminate.
COMPLETE_WITHIN = 90


@pytest.mark.timeout(150 * len(SEEDS))
async def test_restart_anything_at_any_time(tmp_path: Path) -> None:
    began = time.monotonic()
    outcomes: list[chaos.RunOutcome] = []
    for seed in SEEDS:
        workdir = tmp_path / f"seed-{seed}"
        workdir.mkdir()
        run = chaos.Run(workdir, seed)
        try:
            await run.start()
            timed_out = ""
            try:
                await run.run(COMPLETE_WITHIN)
            except TimeoutError as exc:
                timed_out = str(exc)
            outcome = await run.outcome(completed=not timed_out)
            outcome.problems += [timed_out] if timed_out else []
            outcomes.append(outcome)
        finally:
            await run.stop()
    chaos.write_report(REPO / REPORT if REPORT else tmp_path / "chaos.json", outcomes, time.monotonic() - began)

    for run in outcomes:
        where = f"seed {run.seed}: {run.problems}"
        assert run.completed, f"seed {run.seed}: the ensemble did not complete; {where}"
        # every job ran exactly once; a job lost to a sidecar kill is reported, not run again
        assert run.submitted_once, where
        assert run.ran_exactly_once + run.lost_reported == run.jobs == chaos.MEMBERS * chaos.jobs_per_member(), where
        assert (run.ran_twice, run.never_ran, run.unknown_markers, run.failed_otherwise) == (0, 0, 0, 0), where
        # no decision applied twice, no size outside [minSize, maxSize], nothing dead-lettered
        assert run.duplicate_applies == 0, where
        assert run.out_of_bounds_sizes == 0, where
        assert run.deadletters == 0, where
        assert all(fault.recovered for fault in run.faults), [f for f in run.faults if not f.recovered]
    for kind in chaos.KINDS:
        assert sum(f.kind == kind for run in outcomes for f in run.faults) >= len(SEEDS), kind
