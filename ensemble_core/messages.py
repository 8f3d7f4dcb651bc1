"""Messages the services exchange over NATS (see DESIGN.md, "Messages").

Every message is a ``msgspec.Struct`` encoded as JSON, tagged with a ``kind`` field (so a recording
file can hold several kinds, one a line) and carrying a ``version``. Field names follow the original
sidecar's payload so that the original's recorded streams map one to one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias, TypeVar

import msgspec

from ensemble_core.matrix import MatrixRange, Scalar

#: The version of the message schema this code writes. Readers accept this version and refuse others
#: with a message naming the field (a newer writer must bump it only on an incompatible change).
MESSAGE_VERSION = 1

#: The algorithm of a member that names none. ``demand-fit`` since the simulation benchmark
#: (docs/benchmarks.md): on the recorded GKE runs it beats the original operator on both makespan and
#: node-seconds, where ``workload-demand`` (the original's algorithm, fixed) is slower than the original.
DEFAULT_ALGORITHM = "demand-fit"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class Base(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=False):
    """Common fields of every message."""

    version: int = MESSAGE_VERSION


class Addressed(Base, kw_only=True):
    """A message about one ensemble member: its real (unescaped) names travel in the body."""

    namespace: str
    ensemble: str
    member: NonNegative


class JobSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One job group of an ensemble member: ``count`` jobs running ``command`` on ``nodes`` nodes.

    A job's identity is (member, group ``name``, index): the group's jobs are numbered from 0.
    ``retries`` failed attempts (nonzero exit) and ``lost_retries`` lost ones (node, sidecar or broker
    gone, or killed by a shrink) are submitted again; the operator's ledger (``services/actuator/ledger.py``)
    owns that. In a submit to a sidecar, ``start`` is the index of the first of these ``count`` jobs and
    ``attempt`` their attempt number (None: the sidecar numbers them after the group's last).
    ``matrix`` (``ensemble_core.matrix``) makes the group a parameter sweep: parameter name -> listed
    values or a ``MatrixRange``, in the order written. In a member record a group with a matrix has
    ``count == matrix.size(matrix)``, and the group's job ``i`` (0-based) runs with
    ``matrix.params(matrix, i)``. Empty (the default, omitted on the wire): no sweep, ``count`` copies
    of ``command`` as written.
    """

    name: str
    command: str
    count: NonNegative = 1
    nodes: Positive = 1
    tasks: NonNegative = 0
    workdir: str = ""
    duration: NonNegative = 0
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    lost_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    start: NonNegative | None = None
    attempt: Positive = 1
    matrix: dict[str, list[Scalar] | MatrixRange] = {}


class AlgorithmSpec(msgspec.Struct, kw_only=True):
    """An algorithm by name with its options and rules as written by the user (validated separately).

    ``rules`` is read only by the ``rules`` algorithm: a list of trigger/action mappings, kept as the
    raw YAML and checked by ``ensemble_core.algorithms.validate_rules``.
    """

    name: str = DEFAULT_ALGORITHM
    options: dict[str, str | int | float | bool] = {}
    rules: list[dict[str, Any]] = []


class MemberSpec(Addressed, tag="member", kw_only=True):
    """What the services need to know about one member; the value in the ``ensemble-members`` bucket."""

    name: str
    size: Positive
    min_size: Positive
    max_size: Positive
    endpoint: str
    algorithm: AlgorithmSpec
    jobs: list[JobSpec]
    check_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    created: float = 0.0
    #: ``active`` until the actuator terminates or completes the member; the record is kept (not
    #: deleted) so that a restarted creator cannot register a finished member again.
    phase: Literal["active", "completed", "terminated"] = "active"
    #: The read-only token of the member's sidecar (``tokens.status_token``): what the poller presents.
    #: Empty: the poller derives the full token from its operator secret, if it has one (older records).
    status_token: str = ""
    #: Kubernetes mode: the uid of the Ensemble this record belongs to. An Ensemble deleted and created
    #: again under the same name is a new owner: a record (or MiniCluster) of the old one is never its.
    owner_uid: str = ""
    #: The ensemble's weight in the node budget's fair share (``spec.weight``; docs/budget.md).
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class NodeCounts(msgspec.Struct, kw_only=True):
    """Node and core counts, as Flux's resource list reports them."""

    node_cores_free: NonNegative = 0
    node_cores_up: NonNegative = 0
    node_up_count: NonNegative = 0
    node_free_count: NonNegative = 0


class QueueCounts(msgspec.Struct, kw_only=True):
    """Jobs in each Flux job state."""

    new: NonNegative = 0
    depend: NonNegative = 0
    priority: NonNegative = 0
    sched: NonNegative = 0
    run: NonNegative = 0
    cleanup: NonNegative = 0
    inactive: NonNegative = 0

    def active(self) -> int:
        """Jobs not yet inactive (the original's definition of an active queue)."""
        return self.new + self.depend + self.priority + self.sched + self.run + self.cleanup


class GroupStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per job group: how many finished, and run / wait time statistics (seconds) of those finished."""

    submitted: NonNegative = 0
    finished: NonNegative = 0
    succeeded: NonNegative = 0
    failed: NonNegative = 0
    run_mean: float = 0.0
    run_min: float = 0.0
    run_max: float = 0.0
    wait_mean: float = 0.0
    wait_min: float = 0.0
    wait_max: float = 0.0
    #: Sample variance (None below two values), interquartile range and mean absolute deviation (None
    #: before the first value) of the same run / wait times; streaming estimates (``sidecar/streaming.py``).
    run_var: float | None = None
    run_iqr: float | None = None
    run_mad: float | None = None
    wait_var: float | None = None
    wait_iqr: float | None = None
    wait_mad: float | None = None
    #: Jobs that started running (left the queue for nodes), jobs ended by a cancel, and jobs waiting now.
    started: NonNegative = 0
    cancelled: NonNegative = 0
    waiting: NonNegative = 0
    #: Time in the queue (seconds) of every job that started *or still waits* at the snapshot (a waiting
    #: job counts ``time - submit``), so it grows while jobs pile up — the successor's ``<group>-pending``.
    #: ``queued_count`` is how many jobs that covers; mean / min / max are 0 while it is 0.
    queued_count: NonNegative = 0
    queued_mean: float = 0.0
    queued_min: float = 0.0
    queued_max: float = 0.0


class Metrics(Addressed, tag="metrics", kw_only=True):
    """One status snapshot of a member's queue and nodes."""

    seq: NonNegative
    time: float
    size: NonNegative
    nodes: NodeCounts
    queue: QueueCounts
    waiting: dict[int, int] = {}
    next_jobs: list[int] = []
    finished: NonNegative = 0
    failed: NonNegative = 0
    groups: dict[str, GroupStats] = {}
    #: Jobs of the member the operator's ledger does not count as done (no successful attempt, and not
    #: out of retries): running, waiting, or about to be submitted again. None: not known (a recording
    #: made before the ledger, or a poller that cannot read it). An algorithm is idle only at 0.
    outstanding: NonNegative | None = None
    #: 0: a periodic check (one per ``checkSeconds``; what algorithms count). n > 0: the n-th snapshot
    #: pushed by a queue change since check ``seq`` — the same ``seq`` as that check, published at once
    #: for event-driven algorithms (``rules``); the decider gives it to no other algorithm.
    event: NonNegative = 0


Action: TypeAlias = Literal["scale", "submit", "terminate", "complete"]


class Decision(Addressed, tag="decision", kw_only=True):
    """What an algorithm wants done to a member. ``size`` is an absolute target, never a delta."""

    id: str
    time: float
    based_on: NonNegative
    action: str
    size: int | None = None
    jobs: list[JobSpec] = []
    order: str = ""
    seed: int = 0
    reason: str = ""


EventKind: TypeAlias = Literal[
    "created", "ready", "unreachable", "reachable", "scaled", "completed", "terminated", "failed", "gone"
]


class MemberEvent(Addressed, tag="event", kw_only=True):
    """Something that happened to a member."""

    event: EventKind
    time: float
    message: str = ""
    size: int | None = None


class Applied(Addressed, tag="applied", kw_only=True):
    """What the actuator did with a decision, or why it could not."""

    decision: str
    time: float
    ok: bool
    action: str = ""
    size_before: int | None = None
    size_after: int | None = None
    error: str = ""
    #: With a node budget (docs/budget.md): the size the scale asked for (clamped to the member's bounds);
    #: ``size_after`` below it means the budget held the member back. None: no budget.
    size_wanted: int | None = None


JobResult: TypeAlias = Literal["succeeded", "failed", "lost", "cancelled"]


class JobEnded(Addressed, tag="job", kw_only=True):
    """One attempt of a job ended on a member's sidecar (subject ``ensemble.jobs.<member>``).

    ``instance`` names the queue the attempt ran in (a sidecar's journal, or a Flux instance) and
    ``seq`` its place in that queue's order of ends (1, 2, ...): together they identify the report.
    """

    instance: str
    seq: Positive
    id: NonNegative
    group: str
    index: NonNegative
    attempt: Positive
    result: JobResult
    time: float
    nodes: Positive = 1
    command: str = ""
    returncode: int | None = None
    t_submit: float = 0.0
    t_run: float | None = None
    t_end: float = 0.0
    reason: str = ""
    output: str = ""
    stdout: str = ""
    stderr: str = ""
    params: dict[str, str] = {}


class InstanceChanged(Addressed, tag="instance", kw_only=True):
    """A member's sidecar answers from another queue than before: what ``previous`` held is gone.

    Every attempt submitted to ``previous`` that had not ended is lost (and submitted again).
    """

    previous: str
    instance: str
    time: float


JobReport: TypeAlias = JobEnded | InstanceChanged


class DeadLetter(msgspec.Struct, kw_only=True):
    """A message a service could not decode or validate, kept with the reason."""

    service: str
    subject: str
    error: str
    time: float
    data: bytes


Message: TypeAlias = Metrics | Decision | MemberEvent | Applied | MemberSpec | JobEnded | InstanceChanged

_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a message (compact, one line)."""
    return _encoder.encode(message)


T = TypeVar("T")


def decode(data: bytes | str, kind: type[T]) -> T:
    """``msgspec.json.decode(data, type=kind)`` that fails only with ``msgspec.DecodeError`` or
    ``msgspec.ValidationError``, whatever the input: a document nested too deeply for the decoder (which
    raises ``RecursionError``) is a ``DecodeError`` too, so no hostile message can escape the handling
    of bad input."""
    try:
        return msgspec.json.decode(data, type=kind)
    except RecursionError:
        raise msgspec.DecodeError("nested too deeply to decode (over the decoder's depth limit)") from None


def decode_with(decoder: msgspec.json.Decoder[T], data: bytes | str) -> T:
    """:func:`decode` with a prepared decoder."""
    try:
        return decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("nested too deeply to decode (over the decoder's depth limit)") from None


class VersionError(ValueError):
    """A message of a schema version this code does not read."""


def check_version(message: Base) -> None:
    """Refuse a message written with a schema version this code cannot read."""
    if message.version != MESSAGE_VERSION:
        raise VersionError(
            f"version: {message.version} is not supported (this build reads version {MESSAGE_VERSION}); "
            "upgrade the reader or the writer so both use the same message version"
        )
