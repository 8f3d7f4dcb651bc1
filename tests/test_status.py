"""``ensemble status``: the table, ``--json``, ``--watch`` and its errors, read from a real nats-server; and
``ensemble up`` printing the URL that ``status`` reads and writing ``--record``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from rich.console import Console

from ensemble_cli import record, status
from ensemble_cli.main import _parser
from ensemble_cli.status import Latest, member_status
from ensemble_cli.up import nats_command, nats_url
from ensemble_core import natsauth, natsio, subjects
from ensemble_core.messages import Applied, Decision, MemberEvent, MemberSpec, Metrics, encode
from ensemble_core.settings import load
from ensemble_core.subjects import MemberAddress
from tests.conftest import REPO, tls_files
from tests.factories import make_member, make_metrics

CLI = [sys.executable, "-m", "ensemble_cli"]
REASON = "11 jobs waiting for 2 checks; next job needs 3 nodes, 1 free, 0 coming: grow 1 → 3"


def member(ensemble: str = "ens", index: int = 0, namespace: str = "default", **changes: Any) -> MemberSpec:
    return msgspec.structs.replace(
        make_member(), namespace=namespace, ensemble=ensemble, member=index, name=f"{ensemble}-{index}", **changes
    )


def metrics(spec: MemberSpec, seq: int, **kwargs: Any) -> Metrics:
    found = make_metrics(seq, **kwargs)
    return msgspec.structs.replace(
        found, namespace=spec.namespace, ensemble=spec.ensemble, member=spec.member, time=time.time()
    )


def decision(spec: MemberSpec, seq: int, action: str = "scale", size: int | None = 3, reason: str = REASON) -> Decision:
    return Decision(
        namespace=spec.namespace, ensemble=spec.ensemble, member=spec.member, id=f"{spec.namespace}/{spec.ensemble}/"
        f"{spec.member}/{seq}/0", time=time.time(), based_on=seq, action=action, size=size, reason=reason,
    )  # fmt: skip


def applied(d: Decision, ok: bool = True, error: str = "") -> Applied:
    return Applied(
        namespace=d.namespace, ensemble=d.ensemble, member=d.member, decision=d.id, time=time.time(), ok=ok,
        action=d.action, size_before=1, size_after=d.size if ok else 1, error=error,
    )  # fmt: skip


# -- what a member's row says -----------------------------------------------------------------------------


def test_a_row_shows_the_newest_metrics_and_decision_and_whether_it_was_applied() -> None:
    spec = member()
    d = decision(spec, 4)
    row = member_status(Latest(spec, metrics(spec, 4, size=3, up=2, waiting={3: 5}, run=1, finished=7, failed=1), d))
    assert (row.phase, row.size, row.nodes_up, row.waiting, row.running, row.done, row.failed) == (
        "running", 3, 2, 5, 1, 7, 1,
    )  # fmt: skip
    assert row.last_decision is not None and row.last_decision["applied"] is None
    assert status.decision_text(row.last_decision) == "scale to 3 (pending)"
    # an Applied of an older decision says nothing of this one
    older = applied(decision(spec, 2))
    assert member_status(Latest(spec, None, d, older)).last_decision["applied"] is None  # type: ignore[index]
    refused = member_status(Latest(spec, None, d, applied(d, ok=False, error="maxSize 4")))
    assert status.decision_text(refused.last_decision) == "scale to 3 (not applied)"
    assert status.reason_text(refused.last_decision) == f"{REASON} — not applied: maxSize 4"
    done = member_status(Latest(spec, None, d, applied(d)))
    assert status.decision_text(done.last_decision) == "scale to 3 (applied)"


def test_the_phase_comes_from_the_record_then_the_metrics_and_the_last_event() -> None:
    spec = member()
    assert member_status(Latest(spec)).phase == "starting"
    assert member_status(Latest(spec)).size == spec.size  # no metrics yet: the record's size
    now = metrics(spec, 1)
    lost = MemberEvent(namespace="default", ensemble="ens", member=0, event="unreachable", time=now.time + 1)
    assert member_status(Latest(spec, now, event=lost)).phase == "unreachable"
    assert member_status(Latest(spec, msgspec.structs.replace(now, time=now.time + 2), event=lost)).phase == "running"
    ended = msgspec.structs.replace(spec, phase="terminated")
    assert member_status(Latest(ended, now, event=lost)).phase == "terminated"


def lines(width: int, rows: list[Latest]) -> list[str]:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(status.render(status.group(rows), time.time(), width))
    return console.export_text().splitlines()


def test_a_narrow_terminal_shows_every_count_and_the_whole_action_and_folds_only_the_reason() -> None:
    spec = member("hello-world")
    d = decision(spec, 3)
    rows = [Latest(spec, metrics(spec, 3, size=1, up=1, waiting={3: 11}), d, applied(d))]
    narrow = lines(80, rows)
    assert all(len(line) <= 80 for line in narrow), "\n".join(narrow)
    text = "\n".join(narrow)
    assert "scale to 3 (applied)" in text and "…" not in text
    assert re.search(r"member +phase +size +up +wait +run +done +fail +checked +last decision", text)  # none cut
    # the reason, under the table, whole (wrapped between words)
    assert " ".join(text.split("member 0: ", 1)[1].split()) == REASON
    wide = "\n".join(lines(200, rows))
    assert "reason" in wide and REASON in wide and "member 0: " not in wide


def test_the_json_document_has_its_documented_keys() -> None:
    spec = member()
    found = status.document(status.group([Latest(spec, metrics(spec, 1)), Latest(member("other"))]), 5.0)
    assert set(found) == {"version", "time", "ensembles"} and found["version"] == status.JSON_VERSION
    assert [(e["namespace"], e["name"]) for e in found["ensembles"]] == [("default", "ens"), ("default", "other")]
    for ensemble in found["ensembles"]:
        assert set(ensemble) == {"namespace", "name", "members"}
        for row in ensemble["members"]:
            assert tuple(row) == status.JSON_KEYS
    readme = (REPO / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in status.JSON_KEYS), "every --json key is documented in the README"


def test_a_printed_url_never_shows_a_password() -> None:
    assert status.shown_url("nats://reader:s3cret@127.0.0.1:4222") == "nats://reader:***@127.0.0.1:4222"
    assert status.shown_url("nats://a:x@h1:4222,nats://b:y@h2:4222") == "nats://a:***@h1:4222,nats://b:***@h2:4222"
    assert status.shown_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


# -- against a real nats-server ------------------------------------------------------------------------------


def run_status(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "status", "--nats", url, *args], capture_output=True, text=True, timeout=60, check=False
    )


async def publish_member(nc: Client, spec: MemberSpec, *messages: msgspec.Struct) -> None:
    js = nc.jetstream()
    await (await js.key_value(subjects.MEMBERS_BUCKET)).put(
        MemberAddress(spec.namespace, spec.ensemble, spec.member).key, encode(spec)
    )
    address = MemberAddress(spec.namespace, spec.ensemble, spec.member)
    for message in messages:
        subject = {
            Metrics: subjects.metrics,
            Decision: subjects.decisions,
            Applied: subjects.applied,
            MemberEvent: subjects.events,
        }[type(message)](address)
        await js.publish(subject, encode(message))


async def status_in_process(url: str, *args: str) -> tuple[int, str]:
    """``ensemble status --nats URL ARGS`` in this process (what ``run`` does, on the test's event loop): its
    exit code and what it printed."""
    parsed = _parser().parse_args(["status", "--nats", url, *args])
    out = io.StringIO()
    return await status.show(load(nats_url=url), parsed, Console(file=out, width=200, soft_wrap=True)), out.getvalue()


async def test_status_reads_every_ensemble_from_nats_without_leaving_a_consumer(nc: Client, nats_url: str) -> None:
    first, second = member("hello.world"), member("hello.world", 1)
    d = decision(first, 3)
    await publish_member(nc, first, metrics(first, 3, size=3, up=2, waiting={3: 4}, run=1, finished=6), d, applied(d))
    await publish_member(nc, second)
    other = member("sweep", namespace="lab")
    await publish_member(nc, other, metrics(other, 0, size=1, finished=2))
    gone = member("gone")
    await publish_member(nc, gone)
    await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).delete(MemberAddress("default", "gone", 0).key)

    table = run_status(nats_url)
    assert table.returncode == 0, table.stderr
    assert "default/hello.world (workload-demand)" in table.stdout and "lab/sweep" in table.stdout
    assert "gone" not in table.stdout  # a deleted record is not an ensemble
    row = next(line for line in table.stdout.splitlines() if "scale to 3 (applied)" in line)
    assert [cell.strip() for cell in row.split("│")[1:9]] == ["0", "running", "3", "2", "4", "1", "6", "0"]
    assert re.search(r"│\s+1 │ starting", table.stdout)  # no metrics yet

    code, printed = await status_in_process(nats_url, "--json", "hello.world")
    assert code == 0
    found = json.loads(printed)
    assert [e["name"] for e in found["ensembles"]] == ["hello.world"]
    rows = found["ensembles"][0]["members"]
    assert [(r["member"], r["phase"], r["nodes_up"]) for r in rows] == [(0, "running", 2), (1, "starting", None)]
    assert rows[0]["last_decision"]["reason"] == REASON and rows[0]["last_decision"]["applied"]["ok"] is True
    code, printed = await status_in_process(nats_url, "--json", "-n", "lab")
    assert json.loads(printed)["ensembles"][0]["name"] == "sweep"

    # read-only: no consumer was made on any stream
    js = nc.jetstream()
    for stream in (subjects.METRICS_STREAM, subjects.DECISIONS_STREAM, subjects.EVENTS_STREAM):
        assert await js.consumers_info(stream) == []
    assert await js.consumers_info(f"KV_{subjects.MEMBERS_BUCKET}") == []


@contextlib.contextmanager
def nats_with_reader(directory: Path) -> Iterator[str]:
    """A nats-server with the users of ``ensemble up`` (the ``reader`` among them) and an ``admin``; its URL."""
    config = directory / "auth.conf"
    block = natsauth.authorization({s: f"{s}-pw" for s in natsauth.SERVICES}, reader="reader-pw")
    config.write_text(block.replace("  users: [\n", '  users: [\n    {user: admin, password: "admin"},\n', 1))
    (directory / "ports").mkdir()
    process = subprocess.Popen(
        nats_command(directory / "store", directory / "ports", config=config),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (url := nats_url(directory / "ports")) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert url is not None
        yield url
    finally:
        process.terminate()
        process.wait(10)


def as_user(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


async def test_the_read_only_user_reads_the_status_and_records_without_a_consumer(tmp_path: Path) -> None:
    with nats_with_reader(tmp_path) as url:
        admin = await nats.connect(as_user(url, "admin", "admin"))
        try:
            await natsio.declare(admin.jetstream())
            spec = member("ens")
            d = decision(spec, 1)
            await publish_member(admin, spec, metrics(spec, 1, size=2, up=1), d, applied(d), metrics(spec, 2, size=2))
            reader = as_user(url, natsauth.READER, "reader-pw")
            code, printed = await status_in_process(reader, "--json")
            assert code == 0, printed
            (row,) = json.loads(printed)["ensembles"][0]["members"]
            assert (row["seq"], row["size"], row["last_decision"]["applied"]["ok"]) == (2, 2, True)
            # `ensemble record` as this user: refused a consumer, it reads message by message
            out = tmp_path / "recording.jsonl"
            recording = await record.record(load(nats_url=reader), out, None)
            kinds = sorted(type(m).__name__ for m in recording.messages)
            assert kinds == ["Applied", "Decision", "Metrics", "Metrics"]
            assert len(out.read_text().splitlines()) == 4
            for stream in (subjects.METRICS_STREAM, subjects.DECISIONS_STREAM, subjects.EVENTS_STREAM):
                assert await admin.jetstream().consumers_info(stream) == []
        finally:
            await admin.close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: no production NATS to render")
async def test_status_connects_as_the_services_do_and_names_a_read_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_security import PASSWORDS, production_nats, service_url

    # production's NATS: TLS (the CA in SSL_CERT_FILE, as the services trust it) and a user per service
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files(tmp_path, "localhost", "127.0.0.1")))
    with production_nats(tmp_path, PASSWORDS) as port:
        url = service_url("creator", port)
        creator = await nats.connect(url)
        try:
            await natsio.declare(creator.jetstream())
            spec = member("tls")
            key = MemberAddress(spec.namespace, spec.ensemble, spec.member).key
            await (await creator.jetstream().key_value(subjects.MEMBERS_BUCKET)).put(key, encode(spec))
        finally:
            await creator.close()
        started = time.monotonic()
        # the creator's user reads member records and metrics, not decisions or events: said at once, not after
        # the request's timeout
        assert (await status_in_process(url))[0] == status.EXIT_NATS
        message = capsys.readouterr().err
        assert "did not answer a read" in message and "permissions violation" in message.lower(), message
        # (the client lower-cases the server's text) the decisions or the events, read at once
        assert re.search(r"stream\.msg\.get\.ensemble_(decisions|events)", message.lower()), message
        assert "reader" in message and PASSWORDS["creator"] not in message
        assert time.monotonic() - started < status.READ_TIMEOUT


def read_line(stream: IO[str], deadline: float) -> str:
    line = stream.readline()
    assert line and time.monotonic() < deadline, "status --watch stopped printing"
    return line


async def test_watch_refreshes_until_interrupted(nc: Client, nats_url: str) -> None:
    spec = member("watched")
    first = decision(spec, 1, reason="first check")
    await publish_member(nc, spec, metrics(spec, 1), first, applied(first))
    watching = subprocess.Popen(  # noqa: ASYNC220  (the command as a user runs it)
        [*CLI, "status", "--nats", nats_url, "--watch", "--interval", "0.2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watching.stdout is not None
        deadline = time.monotonic() + 30
        rows = json.loads(read_line(watching.stdout, deadline))["ensembles"][0]["members"]
        assert rows[0]["last_decision"]["reason"] == "first check"
        later = decision(spec, 2, action="terminate", size=None, reason="nothing left to run")
        await publish_member(nc, msgspec.structs.replace(spec, phase="terminated"), later, applied(later))
        seen = []
        while not seen or seen[-1]["phase"] != "terminated":
            seen.append(json.loads(read_line(watching.stdout, deadline))["ensembles"][0]["members"][0])
        assert seen[-1]["last_decision"]["action"] == "terminate" and seen[-1]["last_decision"]["applied"]["ok"]
        watching.send_signal(signal.SIGINT)
        assert watching.wait(timeout=15) == 0, watching.stderr.read() if watching.stderr else ""
    finally:
        watching.kill()
        watching.wait()


async def test_no_ensemble_and_no_nats_are_clear_errors(
    nc: Client, nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await status_in_process(nats_url))[0] == status.EXIT_NONE
    message = capsys.readouterr().err
    assert "no ensemble on NATS at" in message and "creator" in message
    assert (await status_in_process(nats_url, "nobody"))[0] == status.EXIT_NONE
    assert "no ensemble named nobody on NATS" in capsys.readouterr().err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert (await status_in_process(f"nats://reader:secret@127.0.0.1:{port}"))[0] == status.EXIT_NATS
    message = capsys.readouterr().err
    assert f"cannot reach NATS at nats://reader:***@127.0.0.1:{port}" in message and "secret" not in message
    assert time.monotonic() - started < 15
    with pytest.raises(SystemExit) as refused:
        _parser().parse_args(["status", "--interval", "0"])
    assert refused.value.code == 2 and "--interval: must be a number of seconds > 0" in capsys.readouterr().err


# -- ensemble up: the URL it prints, --record -------------------------------------------------------------------


#: A short run that still grows once: a two-node job on a member of one node.
SHORT = """
apiVersion: ensemble.flux-framework.org/v1alpha1
kind: Ensemble
metadata: {name: short}
spec:
  checkSeconds: 1
  members:
  - minicluster: {spec: {size: 1, minSize: 1, maxSize: 2}}
    algorithm: {name: workload-demand, options: {scaleChecks: 1, terminateChecks: 2}}
    jobs:
    - {name: pair, command: sleep 1, count: 1, nodes: 2}
    - {name: single, command: sleep 1, count: 2, nodes: 1}
"""


@pytest.mark.timeout(120)
def test_ensemble_up_prints_the_url_status_reads_and_records_the_run(tmp_path: Path) -> None:
    recording = tmp_path / "run.jsonl"
    (tmp_path / "short.yaml").write_text(SHORT)
    up = subprocess.Popen(
        [*CLI, "up", str(tmp_path / "short.yaml"), "--quiet", "--timeout", "90", "--provision-delay", "0.5",
         "--results", str(tmp_path / "results"), "--record", str(recording)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        first = up.stdout.readline()
        assert first.startswith("NATS: nats://reader:"), first
        url = first.split()[1]
        # the printed user may read the run and nothing else: status works with it
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not any(r["last_decision"] for r in rows) and time.monotonic() < deadline:
            found = run_status(url, "--json")
            if found.returncode == 0:
                rows = json.loads(found.stdout)["ensembles"][0]["members"]
            time.sleep(0.5)
        assert rows and rows[0]["last_decision"]["action"] in ("submit", "scale") and rows[0]["max_size"] == 2
        rest = up.stdout.read()
        assert up.wait(timeout=100) == 0, rest
    finally:
        up.kill()
        up.wait()
    assert re.search(r"recorded \d+ metrics, \d+ decisions and \d+ applied to " + re.escape(str(recording)), rest)
    kinds = [json.loads(line)["kind"] for line in recording.read_text().splitlines()]
    assert (
        kinds.count("metrics") > 5
        and kinds.count("decision") >= 3
        and kinds.count("applied") == kinds.count("decision")
    )
    replayed = subprocess.run([*CLI, "replay", str(recording)], capture_output=True, text=True, timeout=60, check=False)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
