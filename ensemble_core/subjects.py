"""NATS subject and KV key names, with reversible escaping of Kubernetes names.

A member is addressed by ``<namespace>.<ensemble>.<member index>``. Kubernetes names may contain dots,
which NATS uses as token separators, so each name is escaped into a token of ``[A-Za-z0-9-_]`` only:
every byte outside ``[A-Za-z0-9-]`` (the escape character ``_`` included) becomes ``_XX`` (two upper-case
hex digits of its UTF-8 byte). The escaping is reversible and the same tokens are valid NATS KV keys.
"""

from __future__ import annotations

import re
from typing import NamedTuple

EVENTS_STREAM = "ENSEMBLE_EVENTS"
METRICS_STREAM = "ENSEMBLE_METRICS"
DECISIONS_STREAM = "ENSEMBLE_DECISIONS"
JOBS_STREAM = "ENSEMBLE_JOBS"

MEMBERS_BUCKET = "ensemble-members"
DECIDER_BUCKET = "ensemble-decider"
ACTUATOR_BUCKET = "ensemble-actuator"
#: The ledger of every member's jobs and their attempts (``services/actuator/ledger.py``).
JOBS_BUCKET = "ensemble-jobs"
#: The node budget's grants: one document (key :data:`BUDGET_KEY`) for every member (docs/budget.md).
BUDGET_BUCKET = "ensemble-budget"
BUDGET_KEY = "grants"
#: The pollers' heartbeats (``live.<poller>``).
POLLERS_BUCKET = "ensemble-pollers"
#: Which poller polls each member (key: the member key; value: the poller's name).
OWNERS_BUCKET = "ensemble-owners"

_SAFE = re.compile(rb"[A-Za-z0-9-]")
_TOKEN = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+")


def escape(name: str) -> str:
    """Escape a name into one NATS subject token (reversible by :func:`unescape`)."""
    if not name:
        raise ValueError("a name to escape must not be empty")
    out = []
    for byte in name.encode("utf-8"):
        char = bytes([byte])
        out.append(char.decode() if _SAFE.fullmatch(char) else f"_{byte:02X}")
    return "".join(out)


def unescape(token: str) -> str:
    """Undo :func:`escape`; raises ``ValueError`` for a token that :func:`escape` cannot produce."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not an escaped name token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode())
            i += 1
    return raw.decode("utf-8")


class MemberAddress(NamedTuple):
    """Where a member lives: its namespace, its ensemble's name and its index in ``spec.members``."""

    namespace: str
    ensemble: str
    member: int

    @property
    def key(self) -> str:
        """The escaped ``<ns>.<ens>.<i>`` form used in subjects and as KV key."""
        return f"{escape(self.namespace)}.{escape(self.ensemble)}.{self.member}"

    @classmethod
    def from_key(cls, key: str) -> MemberAddress:
        """Parse :attr:`key` back (also the last three tokens of a member subject)."""
        parts = key.split(".")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"not a member key (<namespace>.<ensemble>.<index>): {key!r}")
        return cls(unescape(parts[0]), unescape(parts[1]), int(parts[2]))

    @classmethod
    def from_subject(cls, subject: str) -> MemberAddress:
        """The member a per-member subject (``ensemble.<kind>.<ns>.<ens>.<i>``) is about."""
        return cls.from_key(".".join(subject.split(".")[-3:]))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.ensemble}/{self.member}"


def events(address: MemberAddress) -> str:
    """Subject of a member's lifecycle events (stream ``ENSEMBLE_EVENTS``)."""
    return f"ensemble.events.{address.key}"


def metrics(address: MemberAddress) -> str:
    """Subject of a member's status snapshots (stream ``ENSEMBLE_METRICS``)."""
    return f"ensemble.metrics.{address.key}"


def decisions(address: MemberAddress) -> str:
    """Subject of the decisions about a member (stream ``ENSEMBLE_DECISIONS``)."""
    return f"ensemble.decisions.{address.key}"


def applied(address: MemberAddress) -> str:
    """Subject of what the actuator did with a member's decisions (stream ``ENSEMBLE_EVENTS``)."""
    return f"ensemble.applied.{address.key}"


def jobs(address: MemberAddress) -> str:
    """Subject of a member's job reports: attempts that ended, its queue replaced (stream ``ENSEMBLE_JOBS``)."""
    return f"ensemble.jobs.{address.key}"


def deadletter(service: str) -> str:
    """Subject where a service puts the messages it could not decode or validate."""
    return f"ensemble.deadletter.{escape(service)}"


ALL_EVENTS = "ensemble.events.>"
ALL_METRICS = "ensemble.metrics.>"
ALL_DECISIONS = "ensemble.decisions.>"
ALL_APPLIED = "ensemble.applied.>"
ALL_DEADLETTER = "ensemble.deadletter.>"
ALL_JOBS = "ensemble.jobs.>"
