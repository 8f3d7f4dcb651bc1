"""The node budget where decisions are applied: grants recorded with compare-and-set before a grow is applied.

Several ensembles share one cluster. With ``ENSEMBLE_NODE_BUDGET`` (cluster-wide) and/or
``ENSEMBLE_NAMESPACE_BUDGETS`` (per namespace) set, the actuator never lets the members hold more nodes
than a budget, and divides it by weighted max-min fair share (:func:`ensemble_core.budget.fair_share`)
among the members that want nodes, in three levels: the cluster budget among the namespaces (equally:
namespaces are tenants), a namespace's among its ensembles (by ``spec.weight``), an ensemble's among its
members (equally). A member that wants less than its share leaves the rest to the others. docs/budget.md
says why it is built so.

Bookkeeping: one document (:class:`BudgetRecord`) under one key of the ``ensemble-budget`` bucket holds
every member's entry (:class:`Grant`: the size it wants, the nodes granted to it, its weight), so every
change is one compare-and-set on one revision, and two actuator replicas can never both hand out the same
node: the loser reads again and recomputes (:meth:`Budget.change`). The order of effects keeps the
document at or above what the members really hold, whatever crashes:

- a grow is **reserved** before it is applied (:meth:`Budget.reserve`): the grant is written, then the
  MiniCluster is scaled to it (an absolute target, so a redelivery applies it again harmlessly);
- a shrink, terminate or complete **releases** after it is applied (:meth:`Budget.settle`,
  :meth:`Budget.forget`): the nodes count as held until they are gone;
- a grow held back keeps the member's want and its decision in the entry (``held``): whenever nodes
  are free for it (another member shrank or ended, a want dropped), :meth:`Budget.raises` says so and the
  actuator applies the same decision again to the larger grant (``services/actuator/service.py``). A
  restarted actuator finds the wants in the bucket, so no grow is lost.

The budget is enforced on growth only: no member is shrunk to make room (a shrink drains or kills jobs);
a member above its fair share keeps what it holds until its own algorithm gives nodes up. A member's
size at creation and its ``minSize`` are held whatever the budget (the MiniCluster exists with them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ensemble_core import natsio, subjects
from ensemble_core.budget import fair_share
from ensemble_core.messages import Decision, MemberSpec, decode, encode
from ensemble_core.settings import Settings, env_name, parse_namespace_budgets
from ensemble_core.subjects import MemberAddress

log = logging.getLogger("actuator.budget")

T = TypeVar("T")

#: Compare-and-set attempts before a change gives up (the decision is then retried later).
CAS_TRIES = 16


class Grant(msgspec.Struct, kw_only=True):
    """One member's entry: what it wants, what it is granted (at least what it holds), its weight."""

    namespace: str
    ensemble: str
    weight: int = 1
    #: The size the member's last scale asked for (clamped to its bounds).
    want: int
    #: Nodes the member may hold: reserved before a grow, lowered after a shrink.
    granted: int
    #: The size last applied (what the member holds); below ``granted`` while a grow is being applied, or
    #: after one failed to apply (then it is tried again: :meth:`Budget.raises`).
    size: int = 0
    #: The scale decision held back by the budget (``want > granted``), applied again once nodes are free.
    held: Decision | None = None


class BudgetRecord(msgspec.Struct, kw_only=True):
    """The ``ensemble-budget`` document: every member's :class:`Grant`, by member key."""

    members: dict[str, Grant] = {}


@dataclass(frozen=True)
class Limits:
    """The budgets: cluster-wide (None: none) and per namespace."""

    cluster: int | None = None
    namespaces: Mapping[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether any budget is set (without one, the actuator keeps no grants at all)."""
        return self.cluster is not None or bool(self.namespaces)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The budgets of ``ENSEMBLE_NODE_BUDGET`` (0: none) and ``ENSEMBLE_NAMESPACE_BUDGETS``; a bad value
        raises :class:`~ensemble_core.settings.SettingsError` naming the variable."""
        return cls(settings.node_budget or None, parse_namespace_budgets(settings.namespace_budgets))

    def describe(self) -> str:
        """The budgets as a person reads them."""
        parts = [] if self.cluster is None else [f"{self.cluster} nodes ({env_name('node_budget')})"]
        parts += [f"{ns}: {nodes}" for ns, nodes in sorted(self.namespaces.items())]
        return ", ".join(parts) or "none"


def shares(record: BudgetRecord, limits: Limits) -> dict[str, int]:
    """Every member's weighted max-min fair share of the budget for the wants in ``record`` (see the module
    docstring: namespaces equally, ensembles by weight, members equally; a namespace never above its budget)."""
    namespaces: dict[str, dict[str, dict[str, int]]] = {}
    for key, entry in record.members.items():
        namespaces.setdefault(entry.namespace, {}).setdefault(entry.ensemble, {})[key] = entry.want
    ns_wants = {
        ns: min(sum(sum(m.values()) for m in ensembles.values()), limits.namespaces.get(ns, 1 << 62))
        for ns, ensembles in namespaces.items()
    }
    ns_grants = ns_wants if limits.cluster is None else fair_share(ns_wants, {}, limits.cluster)
    result: dict[str, int] = {}
    for ns, ensembles in namespaces.items():
        ens_wants = {name: sum(members.values()) for name, members in ensembles.items()}
        weights = {name: float(record.members[next(iter(members))].weight) for name, members in ensembles.items()}
        ens_grants = fair_share(ens_wants, weights, ns_grants[ns])
        for name, members in ensembles.items():
            result.update(fair_share(members, {}, ens_grants[name]))
    return result


def free_for(record: BudgetRecord, limits: Limits, key: str) -> int | None:
    """Nodes no other member holds, within every budget that covers member ``key`` (None: no limit)."""
    entry = record.members[key]
    free: int | None = None
    others = [other for name, other in record.members.items() if name != key]
    if limits.cluster is not None:
        free = limits.cluster - sum(other.granted for other in others)
    if entry.namespace in limits.namespaces:
        in_namespace = sum(other.granted for other in others if other.namespace == entry.namespace)
        left = limits.namespaces[entry.namespace] - in_namespace
        free = left if free is None else min(free, left)
    return None if free is None else max(free, 0)


def allowed(record: BudgetRecord, limits: Limits, key: str) -> int:
    """The size member ``key`` may hold now: its want, at most its fair share and the nodes free, and never
    less than it holds already (no member is shrunk to make room)."""
    entry = record.members[key]
    free = free_for(record, limits, key)
    fair = shares(record, limits)[key]
    grant = min(entry.want, fair) if free is None else min(entry.want, fair, free)
    return max(grant, min(entry.want, entry.granted))


@dataclass(frozen=True)
class Reservation:
    """What :meth:`Budget.reserve` granted: ``granted`` of the ``wanted`` nodes (``held``: fewer)."""

    wanted: int
    granted: int

    @property
    def held(self) -> bool:
        """Whether the budget holds the member below what it wants."""
        return self.granted < self.wanted


class Budget:
    """The grants in the ``ensemble-budget`` bucket (see the module docstring)."""

    def __init__(self, bucket: KeyValue, limits: Limits) -> None:
        self.bucket = bucket
        self.limits = limits

    async def load(self) -> tuple[BudgetRecord, int | None]:
        """The document and its revision (None: none written yet)."""
        try:
            entry = await self.bucket.get(subjects.BUDGET_KEY)
        except KeyNotFoundError:
            return BudgetRecord(), None
        if not entry.value:
            return BudgetRecord(), entry.revision
        try:
            return decode(entry.value, BudgetRecord), entry.revision
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise natsio.Poison(f"the node budget's record is unreadable: {exc}") from exc

    async def change(self, change: Callable[[BudgetRecord], T]) -> T:
        """Apply ``change`` to the document and save it with compare-and-set, again on a conflict (another
        replica wrote in between: ``change`` then sees its write). Raises :class:`natsio.Transient` after
        :data:`CAS_TRIES` conflicts."""
        for _ in range(CAS_TRIES):
            record, revision = await self.load()
            result = change(record)
            try:
                if revision is None:
                    await self.bucket.create(subjects.BUDGET_KEY, encode(record))
                else:
                    await self.bucket.update(subjects.BUDGET_KEY, encode(record), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return result
        raise natsio.Transient(f"the node budget changed {CAS_TRIES} times while being written; retrying", delay=0.2)

    async def reserve(
        self,
        address: MemberAddress,
        member: MemberSpec,
        decision: Decision,
        want: int,
        current: int,
        *,
        unseen: Mapping[str, MemberSpec] | None = None,
        gone: Iterable[str] = (),
        raise_of: str | None = None,
    ) -> Reservation | None:
        """Record that the member wants ``want`` nodes (it holds ``current``) and grant what the budget allows
        (at least ``current``); a grow held back keeps ``decision`` to be applied again (:meth:`raises`).

        ``unseen``: active members with no entry yet, by key: they hold their size at creation, entered as
        wanting it. ``gone``: keys of members whose record is gone: their entries are dropped. ``raise_of``:
        ``decision`` applies again the held decision of that id; None (stale: the member decided something
        else meanwhile) when that is no longer the member's held decision."""

        def reserve(record: BudgetRecord) -> Reservation | None:
            for key in gone:
                if key != address.key:
                    record.members.pop(key, None)
            for key, other in (unseen or {}).items():
                if key not in record.members and key != address.key:
                    record.members[key] = Grant(
                        namespace=other.namespace, ensemble=other.ensemble, weight=other.weight,
                        want=other.size, granted=other.size, size=other.size,
                    )  # fmt: skip
            entry = record.members.get(address.key)
            if raise_of is not None and (entry is None or entry.held is None or entry.held.id != raise_of):
                return None
            if entry is None:
                entry = record.members[address.key] = Grant(
                    namespace=address.namespace, ensemble=address.ensemble, want=want, granted=current
                )
            entry.weight = member.weight
            entry.want = want
            entry.granted = max(entry.granted, current)
            entry.size = current
            grant = want if want <= current else max(current, allowed(record, self.limits, address.key))
            entry.granted = max(grant, current)
            if raise_of is None:
                entry.held = decision if grant < want else None
            # a raise keeps the held decision until it is applied (settle): one that fails is offered again
            return Reservation(wanted=want, granted=grant)

        return await self.change(reserve)

    async def settle(self, address: MemberAddress, size: int, *, want: int | None = None) -> bool:
        """After a scale or complete was applied: the member holds ``size`` nodes (and wants ``want``, when
        given). Returns whether nodes were released (a held-back member may now grow)."""

        def settle(record: BudgetRecord) -> bool:
            entry = record.members.get(address.key)
            if entry is None:
                return False
            released = size < entry.granted
            entry.granted = entry.size = size
            if want is not None:
                entry.want = want
            if entry.want <= size:
                entry.held = None
            return released

        return await self.change(settle)

    async def forget(self, address: MemberAddress) -> bool:
        """After a terminate: the member holds nothing any more. Returns whether it held nodes."""

        def forget(record: BudgetRecord) -> bool:
            entry = record.members.pop(address.key, None)
            return entry is not None and entry.granted > 0

        return await self.change(forget)

    async def raises(self) -> list[tuple[MemberAddress, Decision, int]]:
        """Held-back members that may now grow: (member, its held decision, the size it may now have). A grant
        reserved but not applied (a crash, a cooldown, a sidecar that did not answer) is listed again."""
        record, _ = await self.load()
        found = []
        for key, entry in sorted(record.members.items()):
            if entry.held is None or entry.size >= entry.want:
                continue
            grant = allowed(record, self.limits, key)
            if grant > entry.size:
                found.append((MemberAddress.from_key(key), entry.held, grant))
        return found
