"""The cluster under the MiniClusters in ``ensemble simulate --cluster``: a node pool of VMs and its autoscaler.

MiniCluster nodes are pods; pods run on VMs, ``pods_per_vm`` to a VM; the bill is the VMs' lives, from
the moment the autoscaler creates one until it deletes it. A pod that fits on a VM already up starts
after ``pod_start_s``; one that fits on no VM makes the autoscaler add VMs (``scale_up_delay_s`` from
the pending pod to the VM's creation, when billing starts, then ``boot_s`` until a pod on it runs).
A VM with no pod is removed once it has been empty for ``unneeded_s`` and no VM was added in the last
``delay_after_add_s``, never below ``min_vms``, all due VMs at once (``bulk``) or one every
``scale_down_interval_s`` (``one-at-a-time``). A pod released by one MiniCluster frees a slot that
another takes before the autoscaler removes the VM. Delays given as lists are drawn with the seed.

Named models (:data:`MODELS`): ``gke-optimize-utilization`` is calibrated on the recorded GKE runs
(``shared/data/seed-gke``; docs/benchmarks.md says how), ``gke-balanced`` is the same pool with the
cluster autoscaler's default scale-down (10 min unneeded, 10 min after an add, one VM at a time), and
``none`` is the simulator's own model without VMs (a node costs from its request to its release).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml


class ClusterError(ValueError):
    """A cluster model that cannot be used; the message names the field and what it takes."""


@dataclass(frozen=True)
class ClusterModel:
    """A node pool and its autoscaler (see the module docstring for what each field means)."""

    name: str
    pods_per_vm: int = 2
    min_vms: int = 3
    max_vms: int | None = None
    scale_up_delay_s: tuple[float, ...] = (28.0,)
    boot_s: tuple[float, ...] = (72.0,)
    pod_start_s: tuple[float, ...] = (30.0,)
    unneeded_s: tuple[float, ...] = (225.0,)
    delay_after_add_s: float = 0.0
    scale_down: str = "bulk"
    scale_down_interval_s: float = 10.0
    #: MiniCluster nodes (pods) all members together may hold; None: no budget.
    budget: int | None = None
    source: str = ""


#: The calibration of ``gke-optimize-utilization`` on the three recorded ensemble runs (run5-random,
#: -ascending, -descending; ``recording.jsonl`` beside ``nodes.jsonl``; docs/benchmarks.md shows the
#: derivation). Seconds from a scale-up request that needed a new VM to the VM's creation (when billing
#: starts): the 16 VMs created by the request that needed them (the others came from pods still
#: pending from the request before). Seconds from a VM's creation to a pod on it joining the Flux
#: instance: the rise of ``node_up_count`` after each such VM. Seconds from the MiniCluster's end (the
#: ``terminate`` decision: every pod gone) to each of the 23 added VMs' removal.
GKE_SCALE_UP_DELAY = (25.0, 25.0, 26.0, 26.0, 26.0, 27.0, 27.0, 28.0, 28.0, 29.0, 29.0, 29.0, 30.0, 30.0, 31.0, 31.0)
GKE_BOOT = (65.0, 70.0, 72.0, 75.0, 80.0, 85.0)
GKE_UNNEEDED = (
    208.0, 221.0, 226.0, 226.0, 226.0, 226.0, 231.0, 231.0,
    218.0, 223.0, 223.0, 223.0, 223.0, 223.0, 228.0, 233.0, 243.0,
    216.0, 216.0, 221.0, 227.0, 227.0, 227.0,
)  # fmt: skip

MODELS: dict[str, ClusterModel] = {
    "gke-optimize-utilization": ClusterModel(
        name="gke-optimize-utilization",
        scale_up_delay_s=GKE_SCALE_UP_DELAY,
        boot_s=GKE_BOOT,
        pod_start_s=(30.0,),
        unneeded_s=GKE_UNNEEDED,
        delay_after_add_s=0.0,
        scale_down="bulk",
        source="fitted on shared/data/seed-gke run5-random/-ascending/-descending (nodes.jsonl, recording.jsonl)",
    ),
    "gke-balanced": ClusterModel(
        name="gke-balanced",
        scale_up_delay_s=GKE_SCALE_UP_DELAY,
        boot_s=GKE_BOOT,
        pod_start_s=(30.0,),
        unneeded_s=(600.0,),
        delay_after_add_s=600.0,
        scale_down="one-at-a-time",
        source="cluster-autoscaler defaults: scale-down-unneeded-time 10m, scale-down-delay-after-add 10m",
    ),
}
NAMES = ("none", *MODELS)
_DELAYS = ("scale_up_delay_s", "boot_s", "pod_start_s", "unneeded_s")


def load_model(text: str) -> ClusterModel | None:
    """``--cluster NAME|FILE``: a named model, or a YAML file of :class:`ClusterModel` fields
    (``base: NAME`` starts from a named model); ``None`` for ``none``. Raises :class:`ClusterError`."""
    if text == "none":
        return None
    if text in MODELS:
        return MODELS[text]
    path = Path(text)
    if not path.exists():
        raise ClusterError(f"--cluster {text!r}: not a model name ({', '.join(NAMES)}) nor a file")
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"{text}: cannot read the cluster model: {exc}") from exc
    if not isinstance(document, dict):
        raise ClusterError(f"{text}: expected a mapping of cluster model fields, e.g. 'pods_per_vm: 2'")
    return model_from(document, default_name=path.stem, where=text)


def model_from(document: Mapping[str, Any], *, default_name: str = "custom", where: str = "cluster") -> ClusterModel:
    """A :class:`ClusterModel` from a mapping of its fields, each checked; :class:`ClusterError` names the field."""
    document = dict(document)
    base_name = document.pop("base", "gke-optimize-utilization")
    if base_name not in MODELS:
        raise ClusterError(f"{where}: base: {base_name!r} is not a model ({', '.join(MODELS)})")
    known = {f.name for f in fields(ClusterModel)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ClusterError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(known))}, base")
    changes: dict[str, Any] = {"name": str(document.pop("name", default_name)), "source": where}
    for key, value in document.items():
        changes[key] = _field(key, value, where)
    model = replace(MODELS[base_name], **changes)
    if model.max_vms is not None and model.max_vms < model.min_vms:
        raise ClusterError(f"{where}: max_vms: {model.max_vms} is below min_vms ({model.min_vms})")
    return model


def _field(key: str, value: Any, where: str) -> Any:
    def integer(low: int, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ClusterError(
                f"{where}: {key}: must be an integer >= {low}{' or null' if optional else ''}, got {value!r}"
            )
        return value

    def seconds(number: Any) -> float:
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
            raise ClusterError(f"{where}: {key}: must be seconds (a finite number >= 0), got {number!r}")
        return float(number)

    if key == "pods_per_vm":
        return integer(1)
    if key == "min_vms":
        return integer(0)
    if key in ("max_vms", "budget"):
        return integer(1 if key == "max_vms" else 0, optional=True)
    if key in _DELAYS:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ClusterError(f"{where}: {key}: give seconds, or a list of seconds to draw from")
        return tuple(seconds(v) for v in values)
    if key in ("delay_after_add_s", "scale_down_interval_s"):
        return seconds(value)
    if key == "scale_down":
        if value not in ("bulk", "one-at-a-time"):
            raise ClusterError(f"{where}: scale_down: must be 'bulk' or 'one-at-a-time', got {value!r}")
        return value
    return str(value)


@dataclass
class VM:
    """One VM's life: billed from ``created`` to ``removed``; pods of members (keys) on it."""

    created: float
    ready: float
    base: bool = False
    pods: list[int] = field(default_factory=list)
    empty_since: float | None = None
    unneeded: float = 0.0
    removed: float | None = None


class Cluster:
    """The VMs of one node pool shared by every simulated member, on the virtual clock.

    Each member (an integer key) asks for pods with :meth:`place` (the sim queue's provisioner) and
    gives them back with :meth:`hold`; :meth:`scale_down` runs the autoscaler's removals up to a time.
    Calls come in time order (the simulation advances every member's events globally in time order).
    """

    def __init__(self, model: ClusterModel, seed: int = 0) -> None:
        self.model = model
        self.rng = random.Random(f"cluster:{seed}")
        self.vms = [VM(created=0.0, ready=0.0, base=True, empty_since=0.0) for _ in range(model.min_vms)]
        for vm in self.vms:
            vm.unneeded = self._draw(model.unneeded_s)
        self.pending: list[int] = []
        self.held: dict[int, int] = {}
        self.node_up: dict[int, Callable[[float], None]] = {}
        self.last_add = -math.inf
        self.last_removal = -math.inf

    def _draw(self, values: tuple[float, ...]) -> float:
        return values[0] if len(values) == 1 else self.rng.choice(values)

    def alive(self, at: float) -> list[VM]:
        return [vm for vm in self.vms if vm.created <= at and (vm.removed is None or vm.removed > at)]

    def _live(self) -> list[VM]:
        return [vm for vm in self.vms if vm.removed is None]

    def join(self, key: int, node_up: Callable[[float], None]) -> None:
        """Register member ``key``; ``node_up(at)`` brings one of its deferred pods up at ``at``."""
        self.node_up[key] = node_up
        self.held.setdefault(key, 0)

    def start(self, key: int, count: int, now: float) -> None:
        """Member ``key`` starts with ``count`` pods up at ``now`` (VMs added at once, already up, if needed)."""
        self.scale_down(now)
        for _ in range(count):
            vm = self._free_vm(now, up_only=True)
            if vm is None:
                vm = VM(created=now, ready=now)
                self.vms.append(vm)
            self._bind(vm, key)
        self.held[key] = self.held.get(key, 0) + count

    def place(self, key: int, now: float, count: int) -> list[float | None]:
        """Delays of ``count`` new pods of member ``key`` at ``now`` (``None``: no room in the pool yet)."""
        self.scale_down(now)
        delays: list[float | None] = []
        for _ in range(count):
            vm = self._free_vm(now, up_only=False)
            if vm is None and self._can_add():
                created = now + self._draw(self.model.scale_up_delay_s)
                vm = VM(created=created, ready=created + self._draw(self.model.boot_s))
                self.vms.append(vm)
                self.last_add = max(self.last_add, created)
            if vm is None:
                self.pending.append(key)
                delays.append(None)
                continue
            self._bind(vm, key)
            delays.append(vm.ready - now if vm.ready > now else self._draw(self.model.pod_start_s))
        self.held[key] = self.held.get(key, 0) + count
        return delays

    def hold(self, key: int, count: int, now: float) -> None:
        """Member ``key`` now holds ``count`` pods: release the rest (waiting ones first, then the newest)."""
        self.scale_down(now)
        excess = self.held.get(key, 0) - count
        if excess <= 0:
            return
        self.held[key] = count
        while excess > 0 and key in self.pending:
            self.pending.reverse()
            self.pending.remove(key)
            self.pending.reverse()
            excess -= 1
        for vm in sorted(self._live(), key=lambda vm: vm.created, reverse=True):
            while excess > 0 and key in vm.pods:
                vm.pods.remove(key)
                excess -= 1
                self._reuse(vm, now)
            if not vm.pods and vm.empty_since is None:
                vm.empty_since = now
                vm.unneeded = self._draw(self.model.unneeded_s)
            if excess <= 0:
                break

    def scale_down(self, until: float) -> None:
        """The autoscaler's removals of empty VMs due at or before ``until``, in time order."""
        while True:
            live = self._live()
            if len(live) <= self.model.min_vms:
                return
            due = [(self._removable_at(vm), index) for index, vm in enumerate(self.vms) if vm in live and not vm.pods]
            if not due:
                return
            at, index = min(due)
            if self.model.scale_down == "one-at-a-time":
                at = max(at, self.last_removal + self.model.scale_down_interval_s)
            if at > until:
                return
            self.vms[index].removed = at
            self.last_removal = at
            if self.pending and self._can_add():
                self._add_for_pending(at)

    def _removable_at(self, vm: VM) -> float:
        assert vm.empty_since is not None
        return max(vm.empty_since + vm.unneeded, vm.created, self.last_add + self.model.delay_after_add_s)

    def _free_vm(self, now: float, *, up_only: bool) -> VM | None:
        slots = [vm for vm in self._live() if len(vm.pods) < self.model.pods_per_vm]
        if up_only:
            slots = [vm for vm in slots if vm.ready <= now]
        # Fill the fullest VM first (as the scheduler's bin-packing under optimize-utilization does),
        # VMs already up before those still booting.
        slots.sort(key=lambda vm: (vm.ready > now, vm.ready if vm.ready > now else 0.0, -len(vm.pods), vm.created))
        return slots[0] if slots else None

    def _can_add(self) -> bool:
        return self.model.max_vms is None or len(self._live()) < self.model.max_vms

    def _bind(self, vm: VM, key: int) -> None:
        vm.pods.append(key)
        vm.empty_since = None

    def _reuse(self, vm: VM, now: float) -> None:
        """A slot freed on ``vm``: a pod waiting for room takes it."""
        if not self.pending:
            return
        key = self.pending.pop(0)
        self._bind(vm, key)
        self.node_up[key](max(now, vm.ready) + self._draw(self.model.pod_start_s))

    def _add_for_pending(self, now: float) -> None:
        while self.pending and self._can_add():
            created = now + self._draw(self.model.scale_up_delay_s)
            vm = VM(created=created, ready=created + self._draw(self.model.boot_s))
            self.vms.append(vm)
            self.last_add = max(self.last_add, created)
            for _ in range(self.model.pods_per_vm):
                if not self.pending:
                    break
                key = self.pending.pop(0)
                self._bind(vm, key)
                self.node_up[key](vm.ready)

    def finish(self, now: float) -> float:
        """Run the autoscaler until the pool is back at ``min_vms``; return when it is (>= ``now``)."""
        self.scale_down(math.inf)
        removals = [vm.removed for vm in self.vms if vm.removed is not None]
        return max([now, *removals])

    def vm_seconds(self, start: float, end: float) -> float:
        """VM-seconds billed between ``start`` and ``end``."""
        total = 0.0
        for vm in self.vms:
            gone = vm.removed if vm.removed is not None else math.inf
            total += max(0.0, min(gone, end) - max(vm.created, start))
        return total

    def vms_added(self) -> int:
        return sum(1 for vm in self.vms if not vm.base)

    def timeline(self, end: float) -> list[tuple[float, int, float]]:
        """``(time, VMs alive, VM-seconds billed so far)`` at each change up to ``end`` (for the plot)."""
        times = sorted({0.0, end, *(vm.created for vm in self.vms), *(vm.removed for vm in self.vms if vm.removed)})
        rows: list[tuple[float, int, float]] = []
        for at in (t for t in times if t <= end):
            rows.append((at, len(self.alive(at)), self.vm_seconds(0.0, at)))
        return rows
