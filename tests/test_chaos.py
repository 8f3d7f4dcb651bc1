"""Restart anything at any time: real ensembles on the local stack while nats-server, each service and
the sidecars are killed (``kill -9``) and started again — one at a time, two at once, and the whole
stack at once — a sidecar hangs (SIGSTOP) and one is slow, at moments drawn from a seed, and every job
still succeeds exactly once.

Each run (one per seed; ``ENSEMBLE_CHAOS_SEEDS=4,5,6`` picks others) injects every fault kind once (see
``tests/chaos.py``), so three runs inject each kind three times; the runs go on at the same time, each on
a stack of its own. Jobs are counted by identity (member,
group, index, attempt) from each attempt's start and end marker lines, cross-checked with the job
reports, the ledgers and the sidecars' listings. The counted outcomes of the runs made are written
before anything is asserted, failures included, into the test's temporary directory: a test never writes
a tracked file. The committed figures (``bench/results/chaos.json`` and their section of
``docs/benchmarks.md``) come from the benchmark command, ``.venv/bin/python -m tests.chaos``, which runs the
same suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import chaos

SEEDS = chaos.seeds_from(dict(os.environ))


@pytest.mark.timeout(150 + 60 * len(SEEDS))
async def test_restart_anything_at_any_time(tmp_path: Path) -> None:
    outcomes, seconds = await chaos.run_suite(tmp_path, SEEDS)
    chaos.write_report(tmp_path / "chaos.json", outcomes, seconds)

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
