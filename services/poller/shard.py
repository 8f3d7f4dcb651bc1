"""Several pollers share the members: each member is polled by exactly one poller at a time.

Two buckets hold the shared state:

- ``ensemble-pollers``: ``live.<poller>``, written by each poller every ``ENSEMBLE_POLLER_HEARTBEAT``
  seconds. A poller is *live* while its key keeps changing: one whose key was not seen to change for
  ``ENSEMBLE_POLLER_LEASE_SECONDS`` (on the observer's own monotonic clock, the way client-go judges a
  Lease, so no two clocks are compared) is gone. A poller that stops (SIGTERM) deletes its key: gone at once.
- ``ensemble-owners``: ``<member key>`` → the poller that polls the member. Only a compare-and-set on the
  key's revision changes it, so two pollers never both own a member.

Who *should* poll a member is decided by rendezvous hashing over the live pollers (each member goes to
the poller with the highest hash of the pair): every poller computes the same answer from the same live
set, a poller that joins takes about 1/N of the members from the others and one that dies gives its
members to the survivors, spread evenly. Every heartbeat each poller:

1. writes its heartbeat. If none succeeded for the lease less one heartbeat, it stops polling everything
   (it is about to be taken for gone, and its members about to be taken over);
2. for each active member: an owner record naming it that the hash gives to another live poller is handed
   over (its loop stopped first, then the record set to the new owner); a member without a record, or
   whose owner is gone, is taken by the poller the hash gives it to (``create`` / ``update(last=revision)``);
3. runs a loop for exactly the members whose record names it, and no other.

A member's loop starts only after the record names this poller and a handing-over poller stops its loop
before it writes the record, so two loops of one member never run at once. The loop reads its sequence
from the stream when it starts and publishes with the stream's expected last subject sequence, so even a
poller that missed the news of its own removal cannot publish a sequence twice (see ``service.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from typing import Protocol

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Gauge

from ensemble_core.messages import MemberSpec
from ensemble_core.settings import Settings

log = logging.getLogger("poller")

#: Key prefix of the pollers' heartbeats in ``ensemble-pollers``.
LIVE = "live."

#: Members whose ownership one poller settles at once (KV writes in flight, loops stopped or started).
BALANCE_CONCURRENCY = 64

OWNED = Gauge("ensemble_poller_owned_members", "Active members this poller polls")
LIVE_POLLERS = Gauge("ensemble_poller_live_pollers", "Pollers this poller sees live (itself included)")


class Loops(Protocol):
    """What runs the member loops (``service.Members``)."""

    async def update(self, key: str, spec: MemberSpec | None) -> None: ...


def identity() -> str:
    """A name for this poller process, unique among pollers (pod or host name, process id, random part)."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9_-]", "-", f"{host}-{os.getpid()}-{os.urandom(3).hex()}")
    return name[-64:]


def preferred(member: str, pollers: frozenset[str]) -> str:
    """The poller rendezvous hashing gives ``member`` to among ``pollers`` (not empty)."""
    return max(pollers, key=lambda poller: hashlib.blake2b(f"{poller}/{member}".encode(), digest_size=8).digest())


class Shard:
    """This poller's share of the members (see the module docstring); feed it records with :meth:`update`."""

    def __init__(self, pollers: KeyValue, owners: KeyValue, loops: Loops, settings: Settings, name: str = "") -> None:
        self.pollers = pollers
        self.owners = owners
        self.loops = loops
        self.name = name or identity()
        self.heartbeat = settings.poller_heartbeat
        self.lease = settings.poller_lease_seconds
        #: active member records, by key
        self.specs: dict[str, MemberSpec] = {}
        #: owner records as last seen: member key -> (poller, revision)
        self.owner_of: dict[str, tuple[str, int]] = {}
        #: pollers by when their heartbeat was last seen to change (monotonic)
        self.seen: dict[str, float] = {}
        #: members whose loop runs here, and the spec it runs with
        self.running: dict[str, MemberSpec] = {}
        self._last_beat = 0.0
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        #: the watches (pollers, owners) that have not yet delivered their initial values
        self._unsynced = 2
        self._cache: tuple[frozenset[str], dict[str, str]] = (frozenset(), {})

    # -- inputs ------------------------------------------------------------------------------------

    async def update(self, key: str, spec: MemberSpec | None) -> None:
        """A member record changed (None: gone or unreadable); only active members are polled."""
        if spec is not None and spec.phase == "active":
            self.specs[key] = spec
        else:
            self.specs.pop(key, None)
        self._wake.set()

    def live(self) -> frozenset[str]:
        """The pollers seen live now (this one while its heartbeats succeed)."""
        now = time.monotonic()
        names = {name for name, at in self.seen.items() if now - at < self.lease}
        if now - self._last_beat < self.lease - self.heartbeat:
            names.add(self.name)
        else:
            names.discard(self.name)
        return frozenset(names)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat and balance every heartbeat (and at once when a record changes) until ``stop``."""
        followers = [asyncio.create_task(self._follow_pollers()), asyncio.create_task(self._follow_owners())]
        try:
            await self._synced.wait()
            while not stop.is_set():
                await self.beat()
                await self.balance()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.heartbeat):  # not wait_for (3.11 cancellation)
                        await self._wake.wait()
        finally:
            for task in followers:
                task.cancel()
            await asyncio.wait(followers)
            await self.leave()

    async def beat(self) -> None:
        """Write this poller's heartbeat; after failures for the lease less one heartbeat, stop every loop."""
        try:
            await self.pollers.put(LIVE + self.name, str(time.time()).encode())
            self._last_beat = time.monotonic()
        except Exception as exc:
            log.warning("heartbeat not written: %s", exc)
            if self.running and time.monotonic() - self._last_beat >= self.lease - self.heartbeat:
                log.error("no heartbeat for %.1f s; stopping every member's loop", time.monotonic() - self._last_beat)
                for key in list(self.running):
                    await self._stop(key)

    async def balance(self) -> None:
        """Hand over, take, and run exactly the members whose record names this poller (see the docstring)."""
        live = self.live()
        LIVE_POLLERS.set(len(live))
        if self.name not in live:
            return  # fenced: beat() stopped every loop
        targets = self._targets(live)
        # members are settled concurrently (each is a KV round trip or two, and a loop to stop or start):
        # one after the other, a poller taking 2,000 members spent tens of seconds on it
        limit = asyncio.Semaphore(BALANCE_CONCURRENCY)

        async def settle(key: str, spec: MemberSpec) -> None:
            async with limit:
                await self._settle(key, spec, targets.get(key) or preferred(key, live), live)

        work = [(key, spec) for key, spec in self.specs.items() if self._to_settle(key, spec, targets, live)]
        await asyncio.gather(*(settle(key, spec) for key, spec in work))
        for key in [key for key in self.running if key not in self.specs]:
            await self._stop(key)
            owner = self.owner_of.get(key)
            if owner is not None and owner[0] == self.name:
                with contextlib.suppress(Exception):
                    await self.owners.delete(key, last=owner[1])
        OWNED.set(len(self.running))

    def _to_settle(self, key: str, spec: MemberSpec, targets: dict[str, str], live: frozenset[str]) -> bool:
        """Whether :meth:`_settle` has anything to do for this member (most heartbeats: for none)."""
        target = targets.get(key) or preferred(key, live)
        owner = self.owner_of.get(key)
        if owner is None:
            return target == self.name or key in self.running
        if owner[0] == self.name:
            return target != self.name or self.running.get(key) != spec
        return (owner[0] not in live and target == self.name) or key in self.running

    async def _settle(self, key: str, spec: MemberSpec, target: str, live: frozenset[str]) -> None:
        """Hand over or take one member's record as the module docstring says, then run its loop if ours."""
        owner = self.owner_of.get(key)
        try:
            if owner is None:
                if target == self.name:
                    revision = await self.owners.create(key, self.name.encode())
                    self.owner_of[key] = (self.name, revision)
            elif owner[0] == self.name:
                if target != self.name:
                    await self._stop(key)
                    revision = await self.owners.update(key, target.encode(), last=owner[1])
                    self.owner_of[key] = (target, revision)
                    log.info("handed over", extra={"member": key, "to": target})
            elif owner[0] not in live and target == self.name:
                revision = await self.owners.update(key, self.name.encode(), last=owner[1])
                self.owner_of[key] = (self.name, revision)
                log.info("took over", extra={"member": key, "from": owner[0]})
        except KeyWrongLastSequenceError:
            await self._reread(key)  # another poller was first: see who owns it now
        except Exception as exc:
            log.warning("ownership of a member not changed: %s", exc, extra={"member": key})
        await self._run_if_owned(key, spec)

    def _targets(self, live: frozenset[str]) -> dict[str, str]:
        """Each active member's poller for this live set (recomputed only when the live set changes)."""
        if self._cache[0] != live:
            self._cache = (live, {})
        cached = self._cache[1]
        for key in self.specs:
            if key not in cached:
                cached[key] = preferred(key, live)
        return cached

    async def _run_if_owned(self, key: str, spec: MemberSpec) -> None:
        owner = self.owner_of.get(key)
        if owner is not None and owner[0] == self.name:
            if self.running.get(key) != spec:
                await self.loops.update(key, spec)
                self.running[key] = spec
        elif key in self.running:
            await self._stop(key)

    async def _stop(self, key: str) -> None:
        if self.running.pop(key, None) is not None:
            await self.loops.update(key, None)

    async def _reread(self, key: str) -> None:
        try:
            entry = await self.owners.get(key)
        except KeyNotFoundError:
            self.owner_of.pop(key, None)
            return
        if entry.value is not None and entry.revision is not None:
            self.owner_of[key] = (entry.value.decode(), entry.revision)

    async def leave(self) -> None:
        """On stop: end every loop, give up the records this poller holds and delete its heartbeat, so the
        others take its members at their next heartbeat instead of after the lease."""
        for key in list(self.running):
            await self._stop(key)
        for key, (owner, revision) in list(self.owner_of.items()):
            if owner == self.name:
                with contextlib.suppress(Exception):
                    await self.owners.delete(key, last=revision)
        with contextlib.suppress(Exception):
            await self.pollers.delete(LIVE + self.name)

    # -- following the buckets ---------------------------------------------------------------------

    async def _follow_pollers(self) -> None:
        synced = False
        while True:
            watcher = await self.pollers.watch(LIVE + ">")
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=self.heartbeat)  # type: ignore[no-untyped-call]
                    except Exception:  # nats TimeoutError: nothing changed meanwhile
                        continue
                    if entry is None:
                        if not synced:
                            synced = True
                            self._owners_or_pollers_synced()
                        continue
                    name = entry.key[len(LIVE) :]
                    if entry.operation is None:
                        self.seen[name] = time.monotonic()
                    else:  # deleted by a poller that stopped: gone now
                        self.seen.pop(name, None)
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch of the pollers failed: %s", exc)
                await asyncio.sleep(self.heartbeat)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow_owners(self) -> None:
        synced = False
        while True:
            watcher = await self.owners.watchall()
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=self.heartbeat)  # type: ignore[no-untyped-call]
                    except Exception:
                        continue
                    if entry is None:
                        if not synced:
                            synced = True
                            self._owners_or_pollers_synced()
                        continue
                    known = self.owner_of.get(entry.key)
                    if known is not None and known[1] >= (entry.revision or 0):
                        continue  # our own write, or older than what we know
                    if entry.operation is None and entry.value is not None:
                        self.owner_of[entry.key] = (entry.value.decode(), entry.revision or 0)
                    else:
                        self.owner_of.pop(entry.key, None)
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch of the member owners failed: %s", exc)
                await asyncio.sleep(self.heartbeat)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    def _owners_or_pollers_synced(self) -> None:
        self._unsynced -= 1
        if self._unsynced == 0:
            self._synced.set()
