"""What applying one decision does to a member, independent of NATS: the actuator's logic.

The actuator service wraps :func:`apply` with its at-most-once bookkeeping (KV record, ``Applied``,
events); ``ensemble simulate`` calls the same function with a simulated driver on a virtual clock,
so what is simulated is what runs.

A shrink given a :class:`Drain` first asks the driver to :meth:`~services.actuator.drivers.Driver.drain`
the nodes that leave, and raises :class:`DrainPending` while some of them still run work, until the
drain's grace is over; then it shrinks whatever runs there (those jobs are lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ensemble_core.messages import Decision, EventKind, MemberSpec
from services.actuator.drivers import Driver, DriverError

log = logging.getLogger("actuator")


class CooldownPending(Exception):
    """A scale came within the member's cooldown; apply it again after ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"scale cooldown, {wait:.1f}s left")
        self.wait = wait


class DrainPending(Exception):
    """A shrink waits for the nodes that leave to be idle: ``busy`` of them still run work (None: the member
    could not be asked, ``why`` says why); apply it again later, with the same :attr:`Drain.started`."""

    def __init__(self, busy: int | None, why: str = "") -> None:
        super().__init__(why or f"{busy} of the nodes that leave still run work")
        self.busy = busy


@dataclass(frozen=True)
class Drain:
    """How long a shrink may wait for the nodes that leave: its drain began at ``started`` (kept by the caller
    across retries and restarts), it is ``now``, and after ``grace`` seconds it shrinks anyway (0: never)."""

    started: float
    now: float
    grace: float

    @property
    def over(self) -> bool:
        """Whether the grace has run out."""
        return self.grace > 0 and self.now - self.started >= self.grace


class InvalidDecision(ValueError):
    """A decision that can never be applied (e.g. a scale without a size)."""


@dataclass(frozen=True)
class Effect:
    """The outcome of one applied decision."""

    ok: bool
    before: int | None = None
    after: int | None = None
    error: str = ""
    #: The member event to publish, if the decision changed the member.
    event: EventKind | None = None
    #: The member's new phase (``terminated``, ``completed``), if it changed.
    phase: str | None = None
    #: Whether the decision changed the requested size (starts a new cooldown).
    scaled: bool = False


def target_size(member: MemberSpec, size: int) -> int:
    """A scale target clamped into ``[max(1, minSize), maxSize]``."""
    return min(max(size, member.min_size, 1), member.max_size)


async def apply(
    decision: Decision,
    member: MemberSpec,
    driver: Driver,
    *,
    since_scale: float,
    cooldown: float,
    drain: Drain | None = None,
) -> Effect:
    """Apply ``decision`` to ``member`` through ``driver``.

    ``since_scale`` is the time since the member's last scale change. A shrink with a ``drain`` waits for the
    nodes that leave (see the module docstring); without one it never waits. Raises :class:`CooldownPending`
    for a scale inside the cooldown, :class:`DrainPending` for a shrink that waits, :class:`InvalidDecision`
    for a malformed decision, and lets the driver's ``DriverError`` through (the caller decides between
    retry and failure).
    """
    if decision.action == "scale":
        if decision.size is None:
            raise InvalidDecision(f"decision {decision.id}: a scale decision needs a size")
        if since_scale < cooldown:
            raise CooldownPending(cooldown - since_scale)
        before = await driver.size(member)
        target = target_size(member, decision.size)
        if drain is not None and target < before:
            await _drained(driver, member, target, drain)
        after = await driver.scale(member, target)
        return Effect(ok=True, before=before, after=after, event="scaled", scaled=True)
    if decision.action == "submit":
        await driver.submit(member, decision)
        return Effect(ok=True)
    if decision.action == "terminate":
        before = await driver.size(member)
        await driver.terminate(member)
        return Effect(ok=True, before=before, after=0, event="terminated", phase="terminated")
    if decision.action == "complete":
        before = await driver.size(member)
        after = await driver.complete(member)
        return Effect(ok=True, before=before, after=after, event="completed", phase="completed")
    return Effect(ok=False, error=f"action {decision.action!r} is not supported")


async def _drained(driver: Driver, member: MemberSpec, target: int, drain: Drain) -> None:
    """Return once a shrink of ``member`` to ``target`` may go on; :class:`DrainPending` while it must wait.

    The member is asked at every try (so a restarted sidecar is told again); one that cannot be reached
    counts as busy until the grace is over.
    """
    try:
        busy = await driver.drain(member, target)
    except DriverError as exc:
        if not exc.transient:
            raise
        if drain.over:
            log.warning("shrink grace over, the member not reachable: shrinking anyway (%s)", exc)
            return
        raise DrainPending(None, f"cannot ask the member to drain: {exc}") from exc
    if not busy:
        return
    if not drain.over:
        raise DrainPending(busy)
    log.warning(
        "shrink grace of %g s over with %d of the nodes that leave still running work: shrinking anyway, "
        "their jobs are lost", drain.grace, busy,
    )  # fmt: skip
