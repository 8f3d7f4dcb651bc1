"""Who may do what on NATS: one user per service, each allowed only what its service does.

The one source of the permissions: ``deploy/kustomize/components/nats-auth/auth.conf`` is
:func:`authorization` with the passwords left to the server's environment (a test checks the committed
file is exactly that), and ``ensemble up`` runs its private nats-server with the same block and
passwords made for the run.

What a user may publish is what its service writes, plus the JetStream API calls it makes — and for
consumers only its own: the decider's durable ``decider`` on ``ENSEMBLE_METRICS``, the actuator's
``actuator`` on ``ENSEMBLE_DECISIONS`` (create, info, next, ack), and ephemeral consumers of the member
records (a KV watch), which deliver only to an inbox of the client's. A consumer of anybody else's
cannot be created, changed, pulled from or acknowledged: a pull's reply subject is where the server
delivers, so ``CONSUMER.MSG.NEXT`` of any consumer would let a user have stored messages delivered
onto a subject it may not publish (``ensemble.decisions.…``, which the actuator applies). Nobody may
delete, purge or update a stream, or delete a consumer. Subscriptions: only the client's inboxes.
"""

from __future__ import annotations

from collections.abc import Mapping

from ensemble_core import subjects

SERVICES = ("creator", "poller", "decider", "actuator")
#: The user ``ensemble up`` watches a run with (its live view): it reads the subjects, writes nothing.
MONITOR = "monitor"
#: A person's (or a test's) user to look at the streams: stream info and single messages, nothing written.
READER = "reader"


#: Our streams, and the streams behind the KV buckets.
STREAMS = (subjects.EVENTS_STREAM, subjects.METRICS_STREAM, subjects.DECISIONS_STREAM, subjects.JOBS_STREAM)
KV_STREAMS = tuple(
    f"KV_{bucket}"
    for bucket in (
        subjects.MEMBERS_BUCKET, subjects.DECIDER_BUCKET, subjects.ACTUATOR_BUCKET, subjects.JOBS_BUCKET,
        subjects.BUDGET_BUCKET,
        subjects.POLLERS_BUCKET, subjects.OWNERS_BUCKET,
    )
)  # fmt: skip

#: The durable consumer each consuming service owns, on its stream (``natsio.DECIDER``, ``natsio.ACTUATOR``).
DURABLES = {
    "decider": (subjects.METRICS_STREAM, "decider"),
    "actuator": (subjects.DECISIONS_STREAM, "actuator"),
    "ledger": (subjects.JOBS_STREAM, "ledger"),
}


def _kv(bucket: str, *, write: bool) -> list[str]:
    """Reading a bucket (direct get of a key, an ephemeral consumer for keys or a watch); writing its keys."""
    rules = [
        f"$JS.API.DIRECT.GET.KV_{bucket}",
        f"$JS.API.DIRECT.GET.KV_{bucket}.>",
        f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
        # ephemeral consumers (keys, a watch): created unnamed, then looked at by the name the server gave
        f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
        f"$JS.API.CONSUMER.INFO.KV_{bucket}.*",
    ]
    if write:
        rules.append(f"$KV.{bucket}.>")
    return rules


def _durable(stream: str, name: str) -> list[str]:
    """Creating, checking, pulling from and acknowledging one durable pull consumer."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


#: What every service does at start (``natsio.declare``): the account's info, and each stream and bucket
#: looked up and created if missing (an existing one is never changed).
_DECLARE = [
    "$JS.API.INFO",
    *(f"$JS.API.STREAM.INFO.{stream}" for stream in (*STREAMS, *KV_STREAMS)),
    *(f"$JS.API.STREAM.CREATE.{stream}" for stream in (*STREAMS, *KV_STREAMS)),
]


def publish_allowed(service: str) -> list[str]:
    """The subjects ``service``'s user may publish to (see the module docstring)."""
    members, decider, actuator = subjects.MEMBERS_BUCKET, subjects.DECIDER_BUCKET, subjects.ACTUATOR_BUCKET
    jobs = subjects.JOBS_BUCKET
    own = {
        # member records and their events; a member's last metrics, for its status
        "creator": [
            *_kv(members, write=True), "ensemble.events.>", subjects.deadletter("creator"),
            f"$JS.API.STREAM.MSG.GET.{subjects.METRICS_STREAM}",
        ],
        # metrics, job reports and reachability events; the member records watched; its last seq and last
        # job report per member; the ledger read for each member's outstanding jobs; the pollers' heartbeats
        # and member ownerships
        "poller": [
            "ensemble.metrics.>", "ensemble.jobs.>", "ensemble.events.>", subjects.deadletter("poller"),
            *_kv(members, write=False), *_kv(jobs, write=False), *_kv(subjects.POLLERS_BUCKET, write=True),
            *_kv(subjects.OWNERS_BUCKET, write=True),
            f"$JS.API.STREAM.MSG.GET.{subjects.METRICS_STREAM}", f"$JS.API.STREAM.MSG.GET.{subjects.JOBS_STREAM}",
        ],
        # decisions and its state; the member records watched; the metrics consumed
        "decider": [
            "ensemble.decisions.>", *_kv(decider, write=True), subjects.deadletter("decider"),
            *_kv(members, write=False), *_durable(*DURABLES["decider"]),
        ],
        # what it did, member events, its records and the members' phases; the decisions consumed; the job
        # ledger and the job reports it consumes; the node budget's grants
        "actuator": [
            "ensemble.applied.>", "ensemble.events.>", *_kv(actuator, write=True), *_kv(members, write=True),
            *_kv(jobs, write=True), subjects.deadletter("actuator"), *_durable(*DURABLES["actuator"]),
            *_durable(*DURABLES["ledger"]), *_kv(subjects.BUDGET_BUCKET, write=True),
        ],
    }[service]  # fmt: skip
    # flow control of the ephemeral (KV) consumers' deliveries
    return [*_DECLARE, *own, "$JS.FC.>"]


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def authorization(
    passwords: Mapping[str, str] | None = None,
    *,
    monitor: str | None = None,
    reader: str | None = None,
) -> str:
    """The ``authorization`` block of a nats-server configuration with the four service users.

    ``passwords``: each service's password; None: ``$NATS_<SERVICE>_PASSWORD``, read by the server from
    its environment (the Kubernetes manifests). ``monitor``: also a read-only user :data:`MONITOR` with this
    password (``ensemble up``'s live view: it may subscribe to ``ensemble.>``, publish nothing).
    ``reader``: also a user :data:`READER` that may read the streams' info and single messages.
    """
    lines = [
        "# Generated by ensemble_core/natsauth.py (authorization()): edit that, not this file; a test compares them.",
        "authorization {",
        "  users: [",
    ]
    for service in SERVICES:
        password = f'"{passwords[service]}"' if passwords is not None else f"$NATS_{service.upper()}_PASSWORD"
        lines += [
            f"    {{user: {service}, password: {password}, permissions: {{",
            f"      publish: {{allow: [{_quoted(publish_allowed(service))}]}},",
            '      subscribe: {allow: ["_INBOX.>"]}',
            "    }},",
        ]
    if monitor is not None:
        lines += [
            f'    {{user: {MONITOR}, password: "{monitor}", permissions: {{',
            '      publish: {deny: [">"]},',
            '      subscribe: {allow: ["ensemble.>"]}',
            "    }},",
        ]
    if reader is not None:
        reads = [f"$JS.API.STREAM.INFO.{stream}" for stream in STREAMS]
        reads += [f"$JS.API.STREAM.MSG.GET.{stream}" for stream in STREAMS]
        # the job ledgers (``ensemble up``'s results) and the member records (``ensemble status``): each
        # bucket looked up (its keys listed from its stream info), its keys read
        for bucket in (subjects.JOBS_BUCKET, subjects.MEMBERS_BUCKET):
            reads += [f"$JS.API.STREAM.INFO.KV_{bucket}", *_kv(bucket, write=False)[:3]]
        lines += [
            f'    {{user: {READER}, password: "{reader}", permissions: {{',
            f'      publish: {{allow: ["$JS.API.INFO", {_quoted(reads)}]}},',
            '      subscribe: {allow: ["_INBOX.>"]}',
            "    }},",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
