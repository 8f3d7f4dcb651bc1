"""What applying one decision does to a member, independent of NATS: the actuator's logic.

The actuator service wraps :func:`apply` with its at-most-once bookkeeping (KV record, ``Applied``,
events); ``ensemble simulate`` calls the same function with a simulated driver on a virtual clock,
so what is simulated is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ensemble_core.messages import Decision, EventKind, MemberSpec
from services.actuator.drivers import Driver


class CooldownPending(Exception):
    """A scale came within the member's cooldown; apply it again after ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"scale cooldown, {wait:.1f}s left")
        self.wait = wait


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
    decision: Decision, member: MemberSpec, driver: Driver, *, since_scale: float, cooldown: float
) -> Effect:
    """Apply ``decision`` to ``member`` through ``driver``.

    ``since_scale`` is the time since the member's last scale change. Raises :class:`CooldownPending`
    for a scale inside the cooldown, :class:`InvalidDecision` for a malformed decision, and lets the
    driver's ``DriverError`` through (the caller decides between retry and failure).
    """
    if decision.action == "scale":
        if decision.size is None:
            raise InvalidDecision(f"decision {decision.id}: a scale decision needs a size")
        if since_scale < cooldown:
            raise CooldownPending(cooldown - since_scale)
        before = await driver.size(member)
        after = await driver.scale(member, target_size(member, decision.size))
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
