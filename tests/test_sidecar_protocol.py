"""The sidecar's wire contract: original-shaped payloads, lost replies, limits, and fuzzed payloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.sidecar_client import SidecarClient, SidecarUnavailable
from ensemble_core.wire import MAX_SUBMIT_JOBS, SubmitResult, decode_status
from sidecar.queue import MAX_KEY_LENGTH
from sidecar.server import SidecarServicer, serve
from sidecar.sim import SimBackend, SimQueue

#: A status as the original sidecar sent it: only its six keys, values as in the recorded GKE run.
ORIGINAL_STATUS = {
    "nodes": {"node_cores_free": 4, "node_cores_up": 4, "node_up_count": 1, "node_free_count": 1},
    "queue": {"new": 0, "depend": 0, "priority": 0, "sched": 12, "run": 0, "cleanup": 0, "inactive": 0},
    "waiting": {"2": 3, "4": 3, "6": 3, "8": 3},
    "nextJobs": [4, 4, 6, 2, 8, 8, 8, 4, 6, 2, 6],
    "counts": {"status": 4, "inactive": 0, "waiting_periods": 4, "waiting": 12},
    "metrics": {"lmp": {"mean": 8.5, "count": 0}},
}


class OriginalSidecar(pb_grpc.EnsembleOperatorServicer):
    """Answers RequestStatus as the original sidecar did."""

    async def RequestStatus(self, request: pb.StatusRequest, context: Any) -> pb.Response:
        return pb.Response(payload=json.dumps(ORIGINAL_STATUS), status=pb.Response.SUCCESS)


async def test_a_status_of_the_original_shape_and_one_of_ours_decode_with_the_same_client() -> None:
    direct = decode_status(json.dumps(ORIGINAL_STATUS))
    server = aio.server()
    pb_grpc.add_EnsembleOperatorServicer_to_server(OriginalSidecar(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with SidecarClient(f"127.0.0.1:{port}") as client:
            original = await client.status()
    finally:
        await server.stop(None)
    assert original == direct
    assert original.waiting == {2: 3, 4: 3, 6: 3, 8: 3} and original.next_jobs[:3] == [4, 4, 6]
    assert (original.queue.sched, original.nodes.node_free_count, original.counts["waiting"]) == (12, 1, 12)
    assert (original.size, original.finished, original.groups, original.terminated) == (None, None, {}, False)

    sim = SimQueue(nodes=1, max_nodes=8, default_duration=5.0, start=50.0)
    running = await serve(SimBackend(sim))
    try:
        async with SidecarClient(f"127.0.0.1:{running.port}") as client:
            await client.action("submit", {"jobs": [{"name": "lmp", "command": "lmp", "nodes": 2, "count": 3}]}, dict)
            ours = await client.status()
    finally:
        await running.stop(grace=0.1)
    assert (ours.waiting, ours.next_jobs, ours.size, ours.finished) == ({2: 3}, [2, 2, 2], 1, 0)
    assert ours.groups["lmp"].submitted == 3 and ours.time is not None and ours.time >= 50.0


@contextlib.contextmanager
def sidecar_in_a_thread(sim: SimQueue) -> Iterator[tuple[int, SimBackend, asyncio.AbstractEventLoop]]:
    """A sim sidecar served by its own event loop in a thread, so it can be slow without slowing the test."""
    ready: dict[str, Any] = {}
    started = threading.Event()
    stop = threading.Event()

    async def main() -> None:
        backend = SimBackend(sim)
        running = await serve(backend)
        ready.update(port=running.port, backend=backend, loop=asyncio.get_running_loop())
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await running.stop(grace=0.1)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield ready["port"], ready["backend"], ready["loop"]
    finally:
        stop.set()
        thread.join(10)


def stall_once(seconds: float) -> Callable[[], None]:
    """A status listener that blocks its server's event loop for ``seconds``, the first time only."""
    done = threading.Event()

    def stall() -> None:
        if not done.is_set():
            done.set()
            threading.Event().wait(seconds)

    return stall


async def test_a_retried_submit_whose_reply_was_lost_queues_the_jobs_once() -> None:
    """The original's GKE runs executed 80 jobs instead of 40: the submit was retried after a timeout."""
    forty = {"jobs": [{"name": "lmp", "command": "lmp", "count": 40, "nodes": 2}]}
    for key, expected in (("decision-seed-0-submit", 40), ("", 80)):
        sim = SimQueue(nodes=1, max_nodes=8, default_duration=10.0)
        with sidecar_in_a_thread(sim) as (port, backend, loop):
            # The server queues the jobs, then is too slow to answer within the client's deadline.
            loop.call_soon_threadsafe(backend.add_listener, stall_once(0.6))
            async with SidecarClient(f"127.0.0.1:{port}", timeout=0.2) as client:
                with pytest.raises(SidecarUnavailable, match="DEADLINE_EXCEEDED"):
                    await client.action("submit", {**forty, "key": key}, SubmitResult)
            async with SidecarClient(f"127.0.0.1:{port}", timeout=5) as client:
                retry = await client.action("submit", {**forty, "key": key}, SubmitResult)
                status = await client.status()
        assert retry.duplicate is bool(key)
        assert status.groups["lmp"].submitted == expected, key or "without a key"


async def act(servicer: SidecarServicer, action: str, payload: str) -> tuple[int, Any]:
    reply = await asyncio.wait_for(servicer.RequestAction(pb.ActionRequest(action=action, payload=payload), None), 5)
    return reply.status, json.loads(reply.payload)


async def test_limits_are_errors_naming_the_problem() -> None:
    servicer = SidecarServicer(SimBackend(SimQueue(nodes=2, max_nodes=4, default_duration=1.0)))
    one = {"name": "g", "command": "true"}
    cases = [
        (
            {"jobs": [{**one, "count": 0}] * (MAX_SUBMIT_JOBS + 1)},
            f"{MAX_SUBMIT_JOBS + 1} job groups exceeds the limit",
        ),
        ({"jobs": [{**one, "count": MAX_SUBMIT_JOBS}, one]}, "jobs: 100001 jobs (after count) exceeds the limit"),
        ({"jobs": [{**one, "count": -3}]}, "Expected `int` >= 0 - at `$.jobs[0].count`"),
        ({"jobs": [{**one, "nodes": 0}]}, "Expected `int` >= 1 - at `$.jobs[0].nodes`"),
        ({"jobs": [{**one, "duration": -1}]}, "at `$.jobs[0].duration`"),
        ({"jobs": [{**one, "nodes": 5}]}, "jobs[0].nodes: 5 exceeds the queue's maximum of 4 nodes"),
        ({"jobs": [{**one, "command": "   "}]}, "jobs[0].command: must not be empty"),
        ({"jobs": [{**one, "name": ""}]}, "jobs[0].name: must not be empty"),
        ({"jobs": [one], "key": "k" * (MAX_KEY_LENGTH + 1)}, f"key: {MAX_KEY_LENGTH + 1} characters exceeds the limit"),
        ([one], "payload: Expected `object`, got `array`"),
    ]
    for payload, message in cases:
        code, reply = await act(servicer, "submit", json.dumps(payload))
        assert code == pb.Response.ERROR, message
        assert message in reply["error"]
    status = json.loads((await servicer.RequestStatus(pb.StatusRequest(), None)).payload)
    assert status["queue"]["sched"] + status["queue"]["run"] == 0


FIELDS = ["jobs", "name", "command", "count", "nodes", "tasks", "workdir", "duration", "order", "seed", "key"]
FIELDS += ["size", "id", "group"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner),
    max_leaves=12,
)
job_like = st.fixed_dictionaries(
    {"name": st.text(max_size=5), "command": st.text(max_size=12)},
    optional={f: json_values | st.integers(-(2**70), 2**70) for f in ("count", "nodes", "tasks", "duration")},
)
payloads = (
    st.text(max_size=60)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {},
        optional={
            "jobs": st.lists(job_like, max_size=3) | json_values,
            "order": st.sampled_from(["random", "ascending", "sideways", ""]) | json_values,
            "seed": json_values,
            "key": json_values,
            "size": st.integers(-(2**70), 2**70) | json_values,
            "id": st.integers(-(2**70), 2**70) | json_values,
            "group": json_values,
        },
    ).map(json.dumps)
)
actions = st.sampled_from(["submit", "jobinfo", "grow", "shrink", "cancel", "terminate", "resetCounter"]) | st.text(
    max_size=10
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=actions, payload=payloads)
def test_fuzzed_payloads_answer_an_error_with_a_message_never_an_exception(action: str, payload: str) -> None:
    loop = asyncio.new_event_loop()
    try:

        async def call() -> tuple[int, Any]:
            servicer = SidecarServicer(SimBackend(SimQueue(nodes=2, max_nodes=4, default_duration=1.0)))
            return await act(servicer, action, payload)

        code, reply = loop.run_until_complete(call())
    finally:
        loop.close()
    assert code in (pb.Response.SUCCESS, pb.Response.ERROR, pb.Response.DENIED)
    if code != pb.Response.SUCCESS:
        assert isinstance(reply, dict) and isinstance(reply["error"], str) and reply["error"]
        assert "failed inside the sidecar" not in reply["error"], reply["error"]
