"""``ensemble up A.yaml B.yaml --budget N``: two ensembles on this machine held to one node budget."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_two_ensembles_share_the_budget_and_the_held_one_grows_when_the_other_gives_nodes_back(tmp_path: Path) -> None:
    files = []
    # the examples, shorter; the two start at one node each, which is the whole budget: whichever asks to grow
    # first is held back until the other ends, and budget-b, with more work, is still growing then
    for name, count in (("budget-a", 3), ("budget-b", 8)):
        document = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
        document["spec"]["members"][0]["jobs"][0].update(count=count, command="sleep 1")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "up", *files, "--budget", "2", "--provision-delay", "0.2",
         "--timeout", "90", "--results", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "node budget: 2 nodes for 2 ensembles" in output
    assert re.search(r"budget-[ab]: member 0: the budget holds it at \d of \d nodes wanted", output), output
    # the sizes the log reports, replayed in order: together they never pass the budget
    sizes = {"budget-a": 1, "budget-b": 1}
    grew_after_hold = False
    held: set[str] = set()
    for found in re.finditer(r"(budget-[ab]): member 0: (scaled (\d+) → (\d+)|the budget holds it|terminated)", output):
        name = found[1]
        if found[2].startswith("the budget"):
            held.add(name)
            continue
        if found[2] == "terminated":
            sizes[name] = 0
            continue
        sizes[name] = int(found[4])
        assert sum(sizes.values()) <= 2, output
        grew_after_hold |= name in held and int(found[4]) > int(found[3])
    assert grew_after_hold, output  # a held-back grow went on once nodes were released
    for name in ("budget-a", "budget-b"):
        assert (tmp_path / "results" / name / "summary.json").is_file()
    assert "budget 2 nodes: budget-a/0 wanted up to" in output


def test_a_job_wider_than_the_budget_and_a_name_used_twice_are_refused_before_anything_starts(tmp_path: Path) -> None:
    def up(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ensemble_cli", "up", *argv, "--results", str(tmp_path / "results")],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip

    wide = up(str(REPO / "examples/hello-world.yaml"), "--budget", "2")
    assert wide.returncode == 2, wide.stdout + wide.stderr
    assert "spec.members[0].jobs[0].nodes: 3 is above --budget 2, so this job could never run" in wide.stdout
    same = up(str(REPO / "examples/budget-a.yaml"), str(REPO / "examples/budget-a.yaml"))
    assert same.returncode == 2 and "metadata.name 'budget-a' is also" in same.stdout, same.stdout
    zero = up(str(REPO / "examples/budget-a.yaml"), "--budget", "0")
    assert zero.returncode == 2 and "argument --budget: must be an integer in 1..100000, got 0" in zero.stderr
    assert not (tmp_path / "results").exists()
