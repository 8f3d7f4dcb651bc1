"""The Kubernetes driver: members are MiniClusters, changed through the Kubernetes API.

- ``scale`` patches the MiniCluster's ``/scale`` subresource (``spec.size``) to the target clamped to the
  bounds the MiniCluster was created with (the Flux Operator silently ignores a size outside
  [minSize, maxSize]), then reads the MiniCluster back and returns the size it now asks for; a size that
  did not take is a transient error (retried later), never reported as applied. A grow (or a scale to the
  size it has) first grows the member's sidecar to the target, so that the ranks of the pods that come
  (or stay) are not left drained by an earlier shrink: the sidecar must answer.
- ``drain`` comes before a shrink: lowering ``/scale`` makes the Flux Operator delete the highest-index pods,
  killing what runs there, so the sidecar is first asked to ``shrink`` to the target — its ``flux`` backend
  drains the partition's highest ranks, and a broker's rank is its pod's completion index — and the shrink
  waits (:mod:`services.actuator.service`) until ``status.draining``, the given-up ranks still busy, is 0.
  A sidecar that does not report ``draining`` (the original's) is not waited for.
- ``terminate`` deletes the MiniCluster (already gone counts as done); ``complete`` leaves it running,
  scaled down to its minSize when ``ENSEMBLE_COMPLETE_TO_MIN_SIZE`` is set.
- ``submit`` goes to the member's sidecar over authenticated gRPC, as in local mode.
- ``report`` writes what became of each decision into the Ensemble's ``status.members[]`` (``requestedSize``,
  ``lastDecision``, ``lastDecisionTime``, ``lastReason``, ``phase``; with a node budget ``nodesWanted`` and
  ``nodesGranted``), ``status.size`` and the ``Scaling`` condition (docs/kubernetes.md has the shape), and
  posts an Event (Normal, or Warning when the decision could not be applied) named after the decision, so a
  redelivered decision leaves one Event; a scale the budget held back adds a Normal ``BudgetHeld`` Event.

Retrying answers (409, 429, 5xx, a broken connection) are retried with backoff by
:class:`ensemble_core.kube.Kube`; when the backoff runs out the error is transient and the actuator
redelivers the decision later. Other refusals (403, 422) are final.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable
from typing import Any, TypeVar

from ensemble_core import minicluster
from ensemble_core.kube import (
    ENSEMBLE_GROUP,
    ENSEMBLE_KIND,
    ENSEMBLE_VERSION,
    Kube,
    KubeError,
    member_status,
    set_condition,
)
from ensemble_core.messages import Applied, Decision, MemberSpec
from ensemble_core.wire import StatusPayload, SubmitResult
from services.actuator.drivers import DriverError, LocalDriver

T = TypeVar("T")
Obj = dict[str, Any]
MC = (minicluster.GROUP, minicluster.VERSION, minicluster.PLURAL)

#: The Event reason of each applied action (a failed one is always ``ActionFailed``).
_REASONS = {"scale": "Scaled", "submit": "Submitted", "terminate": "Terminated", "complete": "Completed"}
_PHASES = {"terminate": "Terminated", "complete": "Completed"}


class KubernetesDriver:
    """Applies decisions to MiniClusters (see the module docstring)."""

    def __init__(self, kube: Kube, sidecar: LocalDriver, complete_to_min_size: bool = False) -> None:
        self.kube = kube
        self.sidecar = sidecar
        self.complete_to_min_size = complete_to_min_size

    async def minicluster(self, member: MemberSpec) -> Obj | None:
        """The member's MiniCluster, or None when it is gone.

        Raises a final :class:`DriverError` when a MiniCluster of that name exists but is not the one the
        member's Ensemble (``owner_uid``) owns: the actuator never scales or deletes what is not ours.
        """
        found = await _kube(self.kube.get(*MC, member.namespace, member.name))
        if found is not None and member.owner_uid and not minicluster.owned_by(found, member.owner_uid):
            owners = [ref.get("uid") for ref in (found.get("metadata") or {}).get("ownerReferences") or []]
            raise DriverError(
                f"MiniCluster {member.namespace}/{member.name} is not this member's (owned by {owners or 'nobody'}, "
                f"the member's Ensemble is uid {member.owner_uid}): left alone",
                transient=False,
            )
        return found

    async def size(self, member: MemberSpec) -> int:
        """The size the MiniCluster asks for (``spec.size``); 0 once it is gone."""
        found = await self.minicluster(member)
        return 0 if found is None else int((found.get("spec") or {}).get("size") or 0)

    async def scale(self, member: MemberSpec, target: int) -> int:
        """Patch ``/scale`` to ``target`` within the MiniCluster's bounds; return the size read back.

        Not lower than the current size: the sidecar is grown to the target first (see the module docstring).
        """
        found = await self.minicluster(member)
        if found is None:
            raise DriverError(f"MiniCluster {member.namespace}/{member.name} is gone", transient=False)
        current, target = _bounded(found, member, target)
        if target >= current:
            await self._size_sidecar(member, target, down=False)
        if target != current:
            await _kube(self.kube.patch_scale(*MC, member.namespace, member.name, target))
        after = await self.size(member)
        if after != target:
            raise DriverError(
                f"MiniCluster {member.name}: asked for size {target}, it still asks for {after}", transient=True
            )
        return after

    async def drain(self, member: MemberSpec, target: int) -> int | None:
        """Shrink the sidecar to ``target`` (clamped as :meth:`scale` clamps it): its ranks from ``target`` up,
        the pods the Flux Operator removes, take no new work; return how many of them still run a job.

        None (nothing to wait for) when the MiniCluster is gone or the sidecar does not report ``draining``.
        """
        found = await self.minicluster(member)
        if found is None:
            return None
        _, target = _bounded(found, member, target)
        status = await self._size_sidecar(member, target, down=True)
        return None if status is None else status.draining

    async def _size_sidecar(self, member: MemberSpec, target: int, *, down: bool) -> StatusPayload | None:
        """Bring the sidecar's size up to ``target`` (and down to it when ``down``); its status afterwards.

        None for a sidecar without a size (the original's): there is nothing to set.
        """
        status = await self.sidecar.status(member)
        if status.size is None:
            return None
        if status.size < target or (down and status.size > target):
            await self.sidecar.scale(member, target)
            status = await self.sidecar.status(member)
        return status

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        """Queue the decision's jobs through the member's sidecar (idempotent on the decision id)."""
        return await self.sidecar.submit(member, decision)

    async def terminate(self, member: MemberSpec) -> None:
        """Delete the MiniCluster (its pods go with it); one already gone is terminated."""
        if await self.minicluster(member) is None:
            return
        await _kube(self.kube.delete(*MC, member.namespace, member.name))

    async def complete(self, member: MemberSpec) -> int:
        """Leave the MiniCluster up (at its minSize when configured so); return its size."""
        if self.complete_to_min_size:
            return await self.scale(member, member.min_size)
        return await self.size(member)

    async def report(self, decision: Decision, applied: Applied) -> None:
        """Write the decision's outcome into the Ensemble's status and post an Event about it."""

        involved: Obj = {}

        def change(status: Obj, ensemble: Obj) -> None:
            involved.update(ensemble)
            entry = member_status(status, decision.member)
            if applied.size_after is not None:
                entry["requestedSize"] = applied.size_after
            if applied.ok and applied.size_wanted is not None and applied.size_after is not None:
                entry["nodesWanted"] = applied.size_wanted
                entry["nodesGranted"] = applied.size_after
            elif applied.ok and decision.action == "terminate" and "nodesGranted" in entry:
                entry["nodesWanted"] = entry["nodesGranted"] = 0
            entry["lastDecision"] = f"scale {applied.size_after}" if decision.action == "scale" else decision.action
            entry["lastDecisionTime"] = datetime.datetime.fromtimestamp(applied.time, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            entry["lastReason"] = applied.error if not applied.ok else (decision.reason or decision.action)
            if applied.ok and decision.action in _PHASES:
                entry["phase"] = _PHASES[decision.action]
            if applied.ok and decision.action == "scale":
                moved = applied.size_before != applied.size_after
                message = f"member {decision.member}: size {applied.size_before} -> {applied.size_after}"
                set_condition(status, "Scaling", moved, "ScaleRequested" if moved else "SizeUnchanged", message, None)
            status["size"] = sum(int(item.get("requestedSize") or 0) for item in status["members"])

        if not await _kube(self.kube.update_status(decision.namespace, decision.ensemble, change)):
            return  # the Ensemble is gone: nobody to tell
        # kubectl describe finds an Event by involvedObject.uid: it must name the Ensemble's
        metadata = involved.get("metadata") or {}
        ensemble = {
            "apiVersion": f"{ENSEMBLE_GROUP}/{ENSEMBLE_VERSION}",
            "kind": ENSEMBLE_KIND,
            "metadata": {"name": decision.ensemble, "namespace": decision.namespace, "uid": metadata.get("uid", "")},
        }
        sizes = "" if applied.size_after is None else f" ({applied.size_before} -> {applied.size_after})"
        if applied.ok:
            message = f"member {decision.member}: {decision.action}{sizes}: {decision.reason or 'applied'}"
            await self.kube.event(
                ensemble, "Normal", _REASONS.get(decision.action, "Applied"), message, key=decision.id
            )
        else:
            message = f"member {decision.member}: {decision.action} not applied: {applied.error}"
            await self.kube.event(ensemble, "Warning", "ActionFailed", message, key=decision.id)
        wanted, granted = applied.size_wanted, applied.size_after
        if applied.ok and wanted is not None and granted is not None and granted < wanted:
            # one Event per member and hold: an algorithm that asks again at every check while it is held back
            # (as the algorithms do, seeing jobs wait) does not post one at every check
            message = (
                f"member {decision.member}: the node budget holds it at {granted} of the {wanted} nodes it wants; "
                "it grows when other members release nodes"
            )
            hold = f"{decision.namespace}/{decision.ensemble}/{decision.member}:budget-held:{granted}:{wanted}"
            await self.kube.event(ensemble, "Normal", "BudgetHeld", message, key=hold)

    async def close(self) -> None:
        """Close the sidecar connections and the API client."""
        await self.sidecar.close()
        await self.kube.close()


def _bounded(found: Obj, member: MemberSpec, target: int) -> tuple[int, int]:
    """The MiniCluster's size and ``target`` clamped to its bounds and the member's."""
    spec = found.get("spec") or {}
    current = int(spec.get("size") or 0)
    low = max(int(spec.get("minSize") or 1), member.min_size)
    high = min(int(spec.get("maxSize") or current or member.max_size), member.max_size)
    return current, min(max(target, low), high)


async def _kube(call: Awaitable[T]) -> T:
    """Await a Kubernetes call, translating its failures into :class:`DriverError`."""
    try:
        return await call
    except KubeError as exc:
        raise DriverError(str(exc), transient=exc.transient) from exc
