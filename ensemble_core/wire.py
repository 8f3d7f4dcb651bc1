"""The JSON payloads carried in the sidecar's gRPC messages (the ``payload`` strings).

The status payload keeps the original sidecar's keys (``nodes``, ``queue``, ``waiting``, ``nextJobs``,
``counts``, ``metrics``) so an original client reads it, and adds ours (``size``, ``finished``,
``failed``, ``groups``, ``time``, ``terminated``, ``draining``). Decoding accepts a payload of the original's shape
(only its keys) as well as ours.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ensemble_core.messages import GroupStats, JobSpec, NodeCounts, QueueCounts, decode

#: Most jobs one submit may queue (after ``count`` is unwrapped); larger lists are refused.
MAX_SUBMIT_JOBS = 100_000

Order = Literal["random", "ascending", "descending", ""]


class StatusPayload(msgspec.Struct, kw_only=True, rename={"next_jobs": "nextJobs"}):
    """One snapshot of a member's queue and nodes, as the sidecar reports it."""

    nodes: NodeCounts
    queue: QueueCounts
    waiting: dict[int, int] = {}
    next_jobs: list[int] = []
    counts: dict[str, int] = {}
    metrics: dict[str, msgspec.Raw] = {}
    size: int | None = None
    finished: int | None = None
    failed: int | None = None
    groups: dict[str, GroupStats] = {}
    time: float | None = None
    terminated: bool = False
    #: The queue this sidecar answers from (its journal's, or the Flux instance's): another value than
    #: before means what was queued before is gone. Empty: an original sidecar, which does not say.
    instance: str = ""
    #: Nodes given up by a shrink that still run work (they leave when it ends, or at the shrink grace);
    #: None from a sidecar that does not say (the original's).
    draining: int | None = None


class SubmitPayload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``submit``: queue job groups. ``key`` makes the submit idempotent (a retry with it queues nothing)."""

    jobs: list[JobSpec]
    order: Order = ""
    seed: int = 0
    key: str = ""


class SubmitResult(msgspec.Struct, kw_only=True):
    """Answer to ``submit``: how many jobs were queued, and whether the key had been seen before."""

    submitted: int
    duplicate: bool = False
    #: The queue the jobs went to (``StatusPayload.instance``).
    instance: str = ""


class ResizePayload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``grow`` / ``shrink``: the absolute number of nodes wanted (applying it twice is harmless)."""

    size: Annotated[int, msgspec.Meta(ge=0)]


class ResizeResult(msgspec.Struct, kw_only=True):
    """Answer to ``grow`` / ``shrink``: the size now requested and the nodes up at this moment."""

    size: int
    nodes_up: int


class JobInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One job as ``jobinfo`` reports it."""

    id: int
    group: str
    command: str
    nodes: int
    state: str
    t_submit: float
    t_run: float | None = None
    t_inactive: float | None = None
    returncode: int | None = None
    success: bool | None = None
    output: str = ""
    #: The job's identity in its group, and which attempt this is.
    index: int = 0
    attempt: int = 1
    #: How it ended (``succeeded``, ``failed``, ``lost``, ``cancelled``); empty while it has not.
    result: str = ""
    #: The job ended without a known outcome (its sidecar restarted while it ran, it was killed after the
    #: shrink grace because its node was given up, Flux lost its node): ``reason`` says which.
    lost: bool = False
    #: Why it was lost or cancelled.
    reason: str = ""
    #: Its place in the queue's order of ends (1, 2, ...); 0 while it has not ended.
    end_seq: int = 0
    #: Files holding its whole stdout / stderr, where the backend writes them.
    stdout: str = ""
    stderr: str = ""
    #: Its parameters (a job group's ``matrix``).
    params: dict[str, str] = {}


#: Most ended jobs one ``RequestJobs`` answer carries.
MAX_ENDED_PAGE = 1000


class EndedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``RequestJobs``: the jobs that ended after the ``after``-th end (0: from the first), at most ``limit``."""

    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_ENDED_PAGE)] = MAX_ENDED_PAGE


class EndedResult(msgspec.Struct, kw_only=True):
    """Answer to ``RequestJobs``: the queue's instance, the jobs in end order, and how many have ended."""

    instance: str
    jobs: list[JobInfo]
    ended: int


def decode_status(payload: str | bytes) -> StatusPayload:
    """Decode a status payload of the original sidecar's shape or ours.

    Raises ``msgspec.ValidationError`` / ``msgspec.DecodeError`` naming the bad field.
    """
    return decode(payload, StatusPayload)
