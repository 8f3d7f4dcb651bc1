"""Restart anything at any time: real ensembles on the local stack while nats-server, each service and
the sidecars are killed (``kill -9``) and started again — one at a time, two at once, and the whole
stack at once — a sidecar hangs (SIGSTOP) and one is slow, at moments drawn from a seed, and every job
still succeeds exactly once.

Each run (one per seed; ``ENSEMBLE_CHAOS_SEEDS=4,5,6`` picks others) injects every fault kind once (see
``tests/chaos.py``), so three runs inject each kind three times; the runs go on at the same time, each on
a stack of its own. Jobs are counted by identity (member,
group, index, attempt) from each attempt's start and end marker lines, cross-checked with the job
reports, the ledgers and the sidecars' listings. The counted outcomes of the runs made are written
before anything is asserted, failures included: into the test's temporary directory, or to
``ENSEMBLE_CHAOS_REPORT`` when set — ``ENSEMBLE_CHAOS_REPORT=bench/results/chaos.json .venv/bin/pytest
tests/test_chaos.py`` refreshes the committed figures (a plain test run never rewrites them), and
``.venv/bin/python -m tests.chaos`` their section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import asyncio
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


@pytest.mark.timeout(150 + 60 * len(SEEDS))
async def test_restart_anything_at_any_time(tmp_path: Path) -> None:
    began = time.monotonic()
    runs: list[chaos.Run] = []

    async def one(run: chaos.Run) -> chaos.RunOutcome:
        timed_out = ""
        try:
            await run.run(COMPLETE_WITHIN)
        except TimeoutError as exc:
            timed_out = str(exc)
        outcome = await run.outcome(completed=not timed_out)
        outcome.problems += [timed_out] if timed_out else []
        return outcome

    try:
        # started one after the other (each takes its ports while no other is choosing), then run at once:
        # every run has its own nats-server, services, sidecars, ports and directories
        for seed in SEEDS:
            workdir = tmp_path / f"seed-{seed}"
            workdir.mkdir()
            run = chaos.Run(workdir, seed)
            runs.append(run)
            await run.start()
        outcomes = list(await asyncio.gather(*(one(run) for run in runs)))
    finally:
        for run in runs:
            await run.stop()
    chaos.write_report(REPO / REPORT if REPORT else tmp_path / "chaos.json", outcomes, time.monotonic() - began)

    expected = chaos.MEMBERS * chaos.jobs_per_member()
    for result in outcomes:
        where = f"seed {result.seed}: {result.problems}"
        assert result.completed, f"seed {result.seed}: the ensemble did not complete; {where}"
        # every job succeeded exactly once: none never ran, none succeeded twice
        assert result.jobs == expected, where
        assert result.succeeded_exactly_once == result.jobs, where
        assert (result.never_ran, result.ran_twice, result.attempts_started_twice) == (0, 0, 0), where
        # the markers, the reports, the sidecars' listings and the ledgers tell the same story
        assert result.cross_check_mismatches == 0, where
        assert result.ledger["succeeded"] == result.jobs and result.ledger["outstanding"] == 0, result.ledger
        assert result.ledger["extra_successes"] == 0, result.ledger
        # every attempt lost was run again: lost attempts and retried jobs go together
        assert (result.lost_attempts == 0) == (result.retried == 0), where
        # no decision applied twice, no size outside [minSize, maxSize], nothing dead-lettered
        assert result.duplicate_applies == 0, where
        assert result.out_of_bounds_sizes == 0, where
        assert result.deadletters == 0, where
        assert result.target_met, where
        assert all(fault.recovered for fault in result.faults), [f for f in result.faults if not f.recovered]
        # each fault's row holds what it caused: together they account for every lost attempt
        assert sum(fault.lost_attempts for fault in result.faults) == result.lost_attempts, where
    for kind in chaos.KINDS:
        assert sum(f.kind == kind for outcome in outcomes for f in outcome.faults) >= len(SEEDS), kind
