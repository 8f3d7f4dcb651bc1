"""The ``flux`` backend: a real Flux instance, reached through a helper run by Flux's own Python.

How the sidecar reaches Flux: it never imports Flux's Python bindings (they belong to the Python
flux-core was built with — in a MiniCluster, the view's, built for the view's glibc). It runs
:mod:`sidecar.flux_helper` with ``flux python`` (``--flux`` names the command; the broker is
``FLUX_URI``) and talks to it over a pipe (:mod:`sidecar.flux_link`), so no call blocks the event loop.

* The sidecar must run as the instance **owner's** uid (the broker's): Flux refuses a guest the events
  journal and unsigned submission, and refuses root's jobs in an instance another user owns (root's
  ``allow-root-owner`` access is not enough). :meth:`FluxBackend.connect` refuses to start as anyone
  else, or on flux-core older than 0.68, with the reason.
* Counts and job records come from the events journal; nodes from ``resource.sched-status`` and
  ``resource.status``, pushed by the helper when they change. A status call is answered from memory.
* If the journal or the helper is lost (the broker restarted, the helper died), the sidecar is
  unhealthy — every call answers ``UNAVAILABLE`` with the reason, gRPC health says NOT_SERVING — and it
  reconnects with backoff, rebuilding its counts from the journal's replay.
* A member may use a **partition** of the instance's ranks (``--ranks``; default all). Its size is the
  number of those ranks it may use: ``grow`` / ``shrink`` undrain / drain the highest ranks of the
  partition (``flux resource drain``, reason ``ensemble-sidecar[<member>]: …``). A drained rank running a
  job goes on until the job ends: a shrink never kills a job. But a job of the member still on a rank it
  gave up ``shrink_grace`` seconds after that rank's drain (Flux's drain timestamp, so a restarted
  sidecar keeps the clock) is killed with a fatal job exception of type
  :data:`~sidecar.backend.SHRINK_EXCEPTION` whose note is the reason; the journal then reports it lost.
  ``status.draining`` counts the given-up ranks still busy. Jobs carry a ``ranks`` constraint when
  the partition is not the whole instance, and the member's tag, so members sharing an instance
  count only their own jobs.
* ``submit`` builds one jobspec per job (:func:`sidecar.flux_records.build_jobspec`: whole nodes,
  the group as job name, the sidecar's environment without its secrets) and sends them in batches,
  asynchronously; with a key, only the jobs Flux has not seen are sent — also after a sidecar restart,
  since the journal replays past jobs with their jobspecs.
* ``cancel`` cancels a group's jobs that have not finished (waiting and running); ``terminate``
  holds every pending job (urgency 0) and refuses further submits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ensemble_core.messages import NodeCounts
from ensemble_core.wire import EndedResult, JobInfo, ResizeResult, StatusPayload, SubmitPayload, SubmitResult
from sidecar.backend import SHRINK_EXCEPTION, SHRINK_GRACE, Listeners, shrink_lost_reason
from sidecar.flux_link import FluxLink, FluxLinkClosed, FluxLinkError, helper_command
from sidecar.flux_records import (
    JobTemplate,
    JournalState,
    Partition,
    RecordError,
    build_jobspec,
    busy_ranks,
    drain_reason,
    drain_times,
    drains,
    encode_idset,
    known_ranks,
    node_counts,
    ranks_of,
    version_problem,
)
from sidecar.queue import (
    MAX_KEY_LENGTH,
    QueueError,
    QueueTerminated,
    QueueUnavailable,
    expand_jobs,
    job_environment,
    job_params,
    output_paths,
    validate_specs,
)

log = logging.getLogger(__name__)

HOW_TO_REACH_FLUX = (
    "the sidecar runs its Flux helper with 'flux python' (the flux command from PATH, or --flux) and "
    "reaches the broker at FLUX_URI; in a Flux Operator MiniCluster that is --flux /mnt/flux/view/bin/flux "
    "and FLUX_URI=local:///mnt/flux/config/run/flux/local"
)

#: Jobspecs per request to the helper: a large submit goes in batches, the journal flowing between them.
SUBMIT_BATCH = 2000
#: Seconds the helper has to answer ``hello`` and to replay the journal, at each connection.
CONNECT_TIMEOUT = 60.0
#: Seconds between two looks for jobs past the shrink grace.
GRACE_TICK = 1.0
#: First and longest wait between two reconnection attempts.
RECONNECT = (0.5, 10.0)
#: errnos of a broker that is not (yet) there: worth waiting for.
_NOT_THERE = (2, 11, 111)  # ENOENT, EAGAIN (the broker not in its run state yet), ECONNREFUSED
_EPERM = 1


class FluxUnavailable(Exception):
    """Flux cannot be used from here; the message says why and what to do."""

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class FluxOptions:
    """How the sidecar reaches its Flux instance and which part of it the member uses.

    ``flux``: the flux command (a name on PATH or a path). ``uri``: the broker (None: ``FLUX_URI``).
    ``ranks``: the member's partition as an idset (None: every rank). ``size``: the size to set at
    start (None: keep what Flux has — the partition's ranks not drained by this member). ``member``:
    the tag on the member's jobs and drains. ``workdir``: the working directory of jobs that name none
    (empty: the broker's). ``wait``: seconds to wait at start for a broker that is not up yet.
    ``release_on_exit``: undrain the ranks this member drained when the sidecar stops. ``shrink_grace``:
    seconds the member's jobs may go on on a rank it gave up before they are killed and reported lost (0: never).
    """

    flux: str = "flux"
    uri: str | None = None
    ranks: str | None = None
    size: int | None = None
    member: str = ""
    workdir: str = ""
    wait: float = 0.0
    release_on_exit: bool = False
    shrink_grace: float = SHRINK_GRACE
    environment: Mapping[str, str] = field(default_factory=lambda: job_environment(os.environ))
    #: each attempt's stdout and stderr in files under this directory (empty: in Flux's KVS only); it must be
    #: where the job's first node writes (the same machine, or a shared file system)
    output_dir: str = ""


class _Session:
    """One connection to Flux: a helper, the journal state it feeds, the latest resource state."""

    def __init__(self, member: str, changed: Any) -> None:
        self.state = JournalState(member)
        self.sched: dict[str, Any] | None = None
        self.resource_status: dict[str, Any] | None = None
        self.hello: dict[str, Any] = {}
        self.link: FluxLink | None = None
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        #: Flux refused this session for good (a guest's EPERM): reconnecting will not help
        self.refused = False
        self.ready = asyncio.Event()
        self._changed = changed

    def instance(self) -> str:
        """The Flux instance's name for ``StatusPayload.instance``: its URI and broker start time, the same
        for every sidecar that reaches it (its jobs outlive a sidecar), another once the broker restarted."""
        return f"{self.hello.get('starttime', 0)}/flux/{self.hello.get('uri', '')}"

    def on_push(self, message: Mapping[str, Any]) -> None:
        kind = message.get("push")
        if kind == "journal":
            record = message.get("record")
            if not isinstance(record, Mapping):
                return
            try:
                self.state.apply_record(record)
            except RecordError:
                log.exception("unreadable journal record for job %s", record.get("id"))
        elif kind == "resources":
            sched, status = message.get("sched"), message.get("status")
            if isinstance(sched, dict) and "error" not in sched:
                self.sched = sched
            if isinstance(status, dict) and "error" not in status:
                self.resource_status = status
        elif kind == "journal-end":
            errno = int(message.get("errno") or 0)
            why = str(message.get("error", ""))
            if errno == _EPERM:
                self.refused = True
                why = f"Flux refused the job journal ({why}): {self._guest_reason()}"
            self._lose(f"the Flux job journal ended: {why}")
            return
        if self.state.replayed and self.sched is not None and self.resource_status is not None:
            self.ready.set()
        self._changed()

    def _guest_reason(self) -> str:
        uid, owner = self.hello.get("uid"), self.hello.get("owner")
        return (
            f"this sidecar runs as uid {uid} but the instance owner is uid {owner}, so it is a guest; "
            f"run the sidecar as uid {owner} (in a MiniCluster: the broker's user, securityContext.runAsUser)"
        )

    def _lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    async def watch_link(self) -> None:
        assert self.link is not None
        # shielded: cancelling this watcher must not cancel the link's own future
        self._lose(await asyncio.shield(self.link.closed))

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()


class FluxBackend(Listeners):
    """The sidecar's view of one Flux instance (see the module docstring). Use :meth:`connect`."""

    def __init__(self, options: FluxOptions) -> None:
        super().__init__()
        self.options = options
        self._session: _Session | None = None
        self._problem: str | None = "connecting to Flux"
        self._partition = Partition(())
        self._size = 0
        self._terminated = False
        self._inflight: dict[str, asyncio.Task[SubmitResult]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def connect(cls, options: FluxOptions | None = None) -> FluxBackend:
        """Connect (waiting ``options.wait`` seconds for a broker that is not up yet), check the version
        and ownership, replay the journal, set the size; then keep the connection (reconnecting when
        it is lost). Raises :class:`FluxUnavailable` with the reason and how to fix it."""
        backend = cls(options or FluxOptions())
        deadline = time.monotonic() + backend.options.wait
        delay = RECONNECT[0]
        while True:
            try:
                session = await backend._open()
                break
            except FluxUnavailable as exc:
                if not exc.retry or time.monotonic() + delay > deadline:
                    raise
                log.info("waiting for the Flux broker: %s", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECONNECT[1])
        try:
            backend._partition = backend._choose_partition(session)
            initial = options.size if options is not None and options.size is not None else None
            backend._size = initial if initial is not None else backend._size_in_flux(session)
            backend._use(session)
            await backend._apply_size(backend._size)
        except BaseException:
            await session.close()
            raise
        backend._supervisor = asyncio.create_task(backend._supervise())
        if backend.options.shrink_grace > 0:
            backend._grace = asyncio.create_task(backend._enforce_grace())
        return backend

    # -- health ----------------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why the backend cannot answer now (lost the journal, reconnecting), or None when healthy."""
        return self._problem

    @property
    def max_nodes(self) -> int:
        """The ranks of the member's partition: its largest size."""
        return len(self._partition.ranks)

    @property
    def partition(self) -> Partition:
        """The ranks the member may use."""
        return self._partition

    # -- Backend ---------------------------------------------------------------------------------

    def status(self) -> StatusPayload:
        """Nodes of the partition from the resource state, queue counts from the journal (from memory)."""
        session = self._healthy()
        allocated = session.state.allocated()
        draining = busy_ranks(self._partition.given_up(self._size), allocated, session.resource_status)
        return session.state.status(
            self._nodes(session, allocated),
            time.time(),
            size=self._size,
            terminated=self._terminated,
            draining=len(draining),
            instance=session.instance(),
        )

    async def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Submit the jobs Flux has not seen for ``payload.key`` (all of them without a key)."""
        if self._terminated:
            raise QueueTerminated("action: the queue is terminated and accepts no more jobs")
        if len(payload.key) > MAX_KEY_LENGTH:
            raise QueueError(f"key: {len(payload.key)} characters exceeds the limit of {MAX_KEY_LENGTH}")
        self._healthy()
        validate_specs(payload.jobs, self.max_nodes)
        for i, spec in enumerate(payload.jobs):
            try:
                build_jobspec(spec, self._template())
            except QueueError as exc:
                raise QueueError(f"jobs[{i}].{exc}") from None
        if not payload.key:
            return await self._submit(payload)
        while (running := self._inflight.get(payload.key)) is not None:
            # the same submit again while it is still going in (a retry after a deadline): wait for it
            with contextlib.suppress(QueueError, FluxLinkClosed):
                await asyncio.shield(running)
        task = asyncio.create_task(self._submit(payload))
        self._inflight[payload.key] = task
        task.add_done_callback(lambda _: self._inflight.pop(payload.key, None))
        return await asyncio.shield(task)

    async def job_info(self, job_id: int) -> JobInfo:
        """One job of the member from the journal; :class:`QueueError` naming ``id`` if there is none."""
        found = self._healthy().state.job(job_id)
        if found is None:
            raise QueueError(f"id: no job with id {job_id} among this member's jobs")
        return found

    async def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs of the member, oldest first."""
        return self._healthy().state.recent(limit)

    async def job_page(self, offset: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` jobs of the member in submit order, from the ``offset``-th."""
        return self._healthy().state.page(offset, limit)

    async def ended(self, after: int, limit: int) -> EndedResult:
        """At most ``limit`` of the member's jobs in the order they ended, after the ``after``-th."""
        session = self._healthy()
        state = session.state
        return EndedResult(instance=session.instance(), jobs=state.ended(after, limit), ended=state.ended_count)

    async def grow(self, size: int) -> ResizeResult:
        """Let the member use ``size`` ranks (>= the current size): undrain the lowest it gave up."""
        if size < self._size:
            raise QueueError(f"size: grow to {size} is below the current size {self._size}; use shrink")
        return await self._resize(size)

    async def shrink(self, size: int) -> ResizeResult:
        """Let the member use ``size`` ranks (<= the current size): drain the highest; jobs there go on until
        the shrink grace (see the module docstring)."""
        if size > self._size:
            raise QueueError(f"size: shrink to {size} is above the current size {self._size}; use grow")
        return await self._resize(size)

    async def cancel(self, group: str) -> int:
        """Cancel the jobs of ``group`` that have not finished (waiting and running); return how many."""
        session = self._healthy()
        ids = session.state.active_ids(group)
        if not ids:
            return 0
        answer = await self._call(
            session, "cancel", ids=ids, reason=f"cancelled by the ensemble sidecar (group {group})"
        )
        log.info("cancel group=%r jobs=%d refused=%d", group, answer["done"], len(answer["errors"]))
        return int(answer["done"])

    async def terminate(self) -> ResizeResult:
        """Refuse further submits and hold every pending job (urgency 0); running jobs go on."""
        session = self._healthy()
        self._terminated = True
        pending = session.state.pending_ids()
        if pending:
            await self._call(session, "urgency", ids=pending, urgency=0)
        self._notify()
        return ResizeResult(size=0, nodes_up=self._nodes(session).node_up_count)

    async def aclose(self) -> None:
        """Stop the helper (Flux and its jobs are left alone); with ``release_on_exit``, undrain first."""
        self._closing = True
        for task in (self._grace, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        session = self._session
        if session is None:
            return
        try:
            if self.options.release_on_exit and self._problem is None:
                try:
                    await self._set_drained(session, frozenset(), "released")
                except (QueueError, FluxLinkClosed, FluxLinkError) as exc:
                    log.error("could not undrain the ranks this member drained: %s", exc)
        finally:
            await session.close()

    # -- internals -------------------------------------------------------------------------------

    def _healthy(self) -> _Session:
        if self._problem is not None or self._session is None:
            raise QueueUnavailable(
                f"flux: {self._problem or 'not connected'}; the sidecar is reconnecting, retry later"
            )
        return self._session

    def _nodes(self, session: _Session, allocated: Mapping[int, set[int]] | None = None) -> NodeCounts:
        assert session.sched is not None
        if allocated is None:
            allocated = session.state.allocated()
        return node_counts(session.sched, session.resource_status, self._partition, allocated)

    def _template(self) -> JobTemplate:
        whole = (
            self._session is None
            or self._session.sched is None
            or (set(self._partition.ranks) == set(known_ranks(self._session.sched)))
        )
        return JobTemplate(
            environment=self.options.environment,
            workdir=self.options.workdir,
            member=self.options.member,
            ranks=None if whole else self._partition.idset(),
            output_dir=self.options.output_dir,
        )

    async def _open(self) -> _Session:
        """A new session: helper started, version and owner checked, journal replayed, resources read."""
        try:
            command = helper_command(self.options.flux)
        except FluxLinkClosed as exc:
            raise FluxUnavailable(str(exc)) from None
        session = _Session(self.options.member, self._changed)
        try:
            session.link = await FluxLink.start(command, session.on_push, uri=self.options.uri)
        except FluxLinkClosed as exc:
            raise FluxUnavailable(f"{exc}; {HOW_TO_REACH_FLUX}") from None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._handshake(session)
        except TimeoutError:
            await session.close()
            raise FluxUnavailable(
                f"Flux did not answer within {CONNECT_TIMEOUT:g} s (hello, journal replay, resources)", retry=True
            ) from None
        except BaseException:
            await session.close()
            raise
        return session

    async def _handshake(self, session: _Session) -> None:
        assert session.link is not None
        try:
            hello = await session.link.call("hello")
        except FluxLinkClosed as exc:
            raise FluxUnavailable(f"{exc}; {HOW_TO_REACH_FLUX}", retry=exc.errno in _NOT_THERE) from None
        session.hello = hello
        version = str(hello.get("version", ""))
        try:
            too_old = version_problem(version)
        except RecordError as exc:
            raise FluxUnavailable(f"flux: {exc}") from None
        if too_old:
            raise FluxUnavailable(too_old)
        uid, owner = int(hello.get("uid", -1)), int(hello.get("owner", -2))
        if uid == 0 and owner != 0:
            raise FluxUnavailable(
                f"not the owner of this Flux instance: this sidecar runs as root (uid 0) but the instance owner is "
                f"uid {owner}; root may read the instance where allow-root-owner is set, but Flux refuses root's jobs "
                'in an instance another user owns (job-ingest: "submission of jobs as user root not supported"); '
                f"run the sidecar as uid {owner} (in a MiniCluster: sidecar.runAsUser: {owner}, the user the "
                "application image runs the broker as)"
            )
        if uid != owner:
            raise FluxUnavailable(
                f"not the owner of this Flux instance: {session._guest_reason()}; Flux refuses a guest the job "
                "journal and unsigned submission"
            )
        await session.link.call("journal")
        await session.link.call("watch-resources")
        ready: asyncio.Future[Any] = asyncio.ensure_future(session.ready.wait())
        try:
            await asyncio.wait({ready, session.lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if session.lost.done():
            # a guest's refusal stays; anything else (the broker went away meanwhile) is worth a retry
            raise FluxUnavailable(session.lost.result(), retry=not session.refused)
        log.info(
            "connected to flux-core %s (uid %s, owner %s, %s ranks) with %s %s",
            version, uid, owner, hello.get("size"), hello.get("executable"), hello.get("python"),
        )  # fmt: skip

    def _choose_partition(self, session: _Session) -> Partition:
        assert session.sched is not None
        known = known_ranks(session.sched)
        if self.options.ranks is None:
            return Partition.of(known)
        try:
            return ranks_of(self.options.ranks, known)
        except QueueError as exc:
            raise FluxUnavailable(f"--{exc}") from None

    def _size_in_flux(self, session: _Session) -> int:
        """The partition's ranks not drained by this member (what a restarted sidecar finds)."""
        mine = drains(session.resource_status, self.options.member).mine
        return len(self._partition.ranks) - len(mine & set(self._partition.ranks))

    def _use(self, session: _Session) -> None:
        self._session = session
        self._problem = None
        self._set_health(None)
        self._notify()

    def _changed(self) -> None:
        self._notify()

    async def _supervise(self) -> None:
        """Wait for the session to be lost; then be unhealthy and reconnect with backoff."""
        while not self._closing:
            session = self._session
            assert session is not None and session.link is not None
            watcher = asyncio.create_task(session.watch_link())
            try:
                why = await asyncio.shield(session.lost)
            finally:
                watcher.cancel()
            self._problem = f"lost Flux ({why})"
            log.error("unhealthy: %s; reconnecting", self._problem)
            self._set_health(self._problem)
            self._notify()
            await session.close()
            delay = RECONNECT[0]
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    fresh = await self._open()
                except FluxUnavailable as exc:
                    self._problem = f"lost Flux ({why}); reconnecting failed: {exc}"
                    log.warning("reconnecting to Flux failed: %s", exc)
                    delay = min(2 * delay, RECONNECT[1])
                    continue
                self._use(fresh)
                with contextlib.suppress(QueueError, FluxLinkClosed, FluxLinkError):
                    await self._apply_size(self._size)
                log.info("reconnected to Flux: healthy again")
                break

    async def _enforce_grace(self) -> None:
        """Every :data:`GRACE_TICK` seconds while healthy, kill the jobs past the shrink grace (see
        :meth:`_kill_overdue`); a failure is logged and tried again at the next tick."""
        while True:
            await asyncio.sleep(GRACE_TICK)
            session = self._session
            if self._problem is not None or session is None:
                continue
            try:
                await self._kill_overdue(session, time.time())
            except (QueueError, RecordError) as exc:
                log.warning("shrink grace: could not kill the jobs past it: %s", exc)

    async def _kill_overdue(self, session: _Session, now: float) -> list[int]:
        """Raise the fatal :data:`SHRINK_EXCEPTION` on the member's running jobs that hold a rank it gave up
        ``shrink_grace`` seconds or more ago (by that rank's drain time in Flux); return their ids."""
        grace = self.options.shrink_grace
        drained_at = drain_times(session.resource_status, self.options.member)
        overdue = {
            rank
            for rank in self._partition.given_up(self._size)
            if rank in drained_at and now - drained_at[rank] >= grace
        }
        ids = session.state.running_on(overdue) if overdue else []
        if not ids:
            return []
        reason = shrink_lost_reason(grace)
        answer = await self._call(session, "raise", ids=ids, type=SHRINK_EXCEPTION, note=reason)
        log.warning(
            "shrink grace: jobs %s still on ranks %s given up over %g s ago were killed (lost); refused: %s",
            ids, encode_idset(overdue), grace, answer["errors"],
        )  # fmt: skip
        return ids

    async def _call(self, session: _Session, op: str, **arguments: Any) -> Any:
        assert session.link is not None
        try:
            return await session.link.call(op, **arguments)
        except FluxLinkClosed as exc:
            raise QueueUnavailable(f"flux: {exc}; retry later") from None
        except FluxLinkError as exc:
            raise QueueError(f"flux: {op} refused by Flux: {exc.message}") from None

    async def _submit(self, payload: SubmitPayload) -> SubmitResult:
        session = self._healthy()
        template = self._template()
        state = session.state
        done = state.key_indices(payload.key) if payload.key else set()
        ordered = expand_jobs(payload.jobs, payload.order, payload.seed, state.next_index)
        # an attempt goes to Flux once: not again with the same key (the journal replays past jobs with their
        # attributes, also after a sidecar restart), nor in another submit that carries it again
        todo = [
            (index, spec, job_index)
            for index, (spec, job_index) in enumerate(ordered)
            if index not in done and not state.has_attempt(spec.name, job_index, spec.attempt)
        ]
        params_of = {(spec.name, job_index): job_params(spec, job_index) for _, spec, job_index in todo}
        for _, spec, job_index in todo:
            state.note_attempt(spec.name, job_index, spec.attempt)
        if template.output_dir:
            for group in {spec.name for _, spec, _ in todo}:
                folder = os.path.dirname(output_paths(template.output_dir, group, 0, 1)[0])
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise QueueError(f"output directory: cannot create {folder}: {exc.strerror}") from None
        sent = 0
        for start in range(0, len(todo), SUBMIT_BATCH):
            batch = todo[start : start + SUBMIT_BATCH]
            jobspecs = [
                build_jobspec(
                    spec,
                    template,
                    key=payload.key,
                    index=index,
                    job_index=job_index,
                    params=params_of[(spec.name, job_index)],
                )
                for index, spec, job_index in batch
            ]
            answer = await self._call(session, "submit", jobspecs=jobspecs)
            refused: tuple[int, str, str] | None = None
            for (index, spec, _), outcome in zip(batch, answer["ids"], strict=True):
                if "id" in outcome:
                    sent += 1
                    if payload.key:
                        state.note_submitted(payload.key, index)
                elif refused is None:
                    refused = (index, spec.name, str(outcome.get("error", "")))
            if refused is not None:
                index, name, why = refused
                raise QueueError(
                    f"jobs: Flux refused job {index} of group {name!r} ({why}); {sent} of {len(ordered)} were "
                    "queued, retry with the same key to queue the rest"
                )
        log.info("submit jobs=%d sent=%d key=%r", len(ordered), sent, payload.key)
        return SubmitResult(
            submitted=len(ordered), duplicate=bool(payload.key) and sent == 0, instance=session.instance()
        )

    async def _resize(self, size: int) -> ResizeResult:
        if self._terminated:
            raise QueueTerminated("action: the queue is terminated and cannot be resized")
        if not 0 <= size <= self.max_nodes:
            raise QueueError(f"size: {size} is outside 0..{self.max_nodes} (the ranks of this member's partition)")
        self._healthy()
        await self._apply_size(size)
        self._size = size
        self._notify()
        session = self._healthy()
        return ResizeResult(size=size, nodes_up=self._nodes(session).node_up_count)

    async def _apply_size(self, size: int) -> None:
        """Make the ranks this member drained exactly those a member of ``size`` gives up."""
        session = self._healthy()
        await self._set_drained(session, self._partition.given_up(size), f"size {size}")

    async def _set_drained(self, session: _Session, wanted: frozenset[int], why: str) -> None:
        mine = drains(session.resource_status, self.options.member).mine & set(self._partition.ranks)
        to_drain, to_undrain = wanted - mine, mine - wanted
        if to_drain:
            await self._call(
                session, "drain", ranks=encode_idset(to_drain), reason=drain_reason(self.options.member, why)
            )
        if to_undrain:
            await self._call(session, "undrain", ranks=encode_idset(to_undrain))
        if to_drain or to_undrain:
            fresh = await self._call(session, "resources")
            session.sched, session.resource_status = fresh["sched"], fresh["status"]
            log.info("ranks drained=%s undrained=%s (%s)", encode_idset(to_drain), encode_idset(to_undrain), why)
