"""The flux backend's helper: run by Flux's own Python, it speaks to the broker for the sidecar.

The sidecar runs on whatever Python our package was installed into; Flux's Python bindings belong
to the Python flux-core was built with (in a Flux Operator MiniCluster: the view's, built for the
view's glibc and libpython). So the sidecar never imports ``flux``: it starts this file with Flux's
own interpreter (``flux python flux_helper.py``), and the two talk JSON lines over a pipe.

This file imports nothing of ours and only the standard library besides ``flux``, and stays valid
Python 3.6 (the oldest Python flux-core supports; annotations are quoted so that 3.6 never evaluates
them): it is copied into no venv and depends on nothing.

Protocol (one JSON object a line; stdin: requests, stdout: answers and pushes):

* request ``{"id": n, "op": NAME, ...arguments}``; answer ``{"id": n, "ok": true, "result": ...}``
  or ``{"id": n, "ok": false, "errno": e, "error": text}``.
* pushes ``{"push": "journal", "record": R}`` for each response of the job-manager's events journal
  (``R`` as Flux sends it: ``{"id", "events", "jobspec"?, "R"?}``; id -1 ends the replay of past
  jobs), ``{"push": "journal-end", "errno": e, "error": text}`` when that stream fails or ends,
  ``{"push": "resources", "sched": ..., "status": ...}`` whenever the scheduler's resource sets or
  the resource module's status (online, drained ranks) change, and ``{"push": "fatal", ...}`` just
  before the helper exits because Flux cannot be used.

Operations: ``hello`` (version, owner, uid, size), ``journal`` (start the journal stream),
``watch-resources`` (start the resource pushes), ``resources`` (the resource state now), ``submit``
(jobspecs, submitted asynchronously in one batch; answers their ids in order), ``cancel``,
``raise`` (a job exception), ``urgency``, ``drain``, ``undrain``. The helper exits when stdin ends (the
sidecar went away) or the broker connection breaks.
"""

import errno
import json
import os
import signal
import sys
import typing

# This file sits beside modules of the sidecar whose names are also those of modules Flux imports
# (flux.py, queue.py): the script's own directory must not come first on the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

#: Seconds between two reads of the resource state (drains, nodes going up or down).
RESOURCE_INTERVAL = 0.5
#: Seconds after an allocation changes before the resource state is read again.
RESOURCE_SOON = 0.01

_ALLOCATION_EVENTS = ("alloc", "free")

Message = typing.Dict[str, typing.Any]


def _out(message: "Message") -> None:
    """Write one JSON line to stdout, all of it (the pipe may take it in pieces)."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


def _failure(request_id: "typing.Any", exc: "BaseException") -> "Message":
    code = getattr(exc, "errno", None) or 0
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return {"id": request_id, "ok": False, "errno": code, "error": text}


def _oserror(exc: "OSError") -> "Message":
    return {"errno": exc.errno or 0, "error": exc.strerror or str(exc)}


class Helper:
    """One broker connection and the requests the sidecar sends over it."""

    def __init__(self, flux_module: "typing.Any") -> None:
        import flux.constants
        import flux.job

        self.constants = flux.constants
        self.job = flux.job
        self.handle = flux_module.Flux()
        self.buffer = b""
        self.last_resources = ""
        self.soon = None  # type: typing.Any
        self.keep = set()  # type: typing.Set[typing.Any]

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve requests until stdin ends; the reactor also drives every RPC and timer."""
        watcher = self.handle.fd_watcher_create(0, self._readable, events=self.constants.FLUX_POLLIN)
        watcher.start()
        self.keep.add(watcher)
        self.handle.reactor_run()

    def _readable(
        self, handle: "typing.Any", watcher: "typing.Any", fd_int: int, revents: int, args: "typing.Any" = None
    ) -> None:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            handle.reactor_stop()
            return
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        request_id = None
        try:
            request = json.loads(line.decode())
            request_id = request.get("id")
            method = getattr(self, "op_" + str(request.get("op", "")).replace("-", "_"), None)
            if method is None:
                raise ValueError("unknown op " + repr(request.get("op")))
            method(request_id, request)
        except Exception as exc:  # every failure is answered: the sidecar waits for each id
            _out(_failure(request_id, exc))

    def _answer(self, request_id: "typing.Any", result: "typing.Any") -> None:
        _out({"id": request_id, "ok": True, "result": result})

    # -- operations ------------------------------------------------------------------------------

    def op_hello(self, request_id: "typing.Any", request: "Message") -> None:
        """What the sidecar checks before it serves: the version and who owns the instance.

        First wait for the broker's run state: its socket exists from the start, but until rc1 has loaded
        the modules, job-manager's journal and job-list answer ENOSYS ("No service matching ...")."""
        handle = self.handle
        try:
            handle.rpc("state-machine.wait").get()
        except OSError as exc:
            raise OSError(
                errno.EAGAIN,
                "the broker is not running (starting up or shutting down): state-machine.wait: "
                + (exc.strerror or str(exc)),
            ) from None
        self._answer(
            request_id,
            {
                "version": handle.attr_get("version"),
                "owner": int(handle.attr_get("security.owner")),
                "uid": os.getuid(),
                "size": int(handle.attr_get("size")),
                "starttime": handle.attr_get("broker.starttime"),
                "uri": handle.attr_get("local-uri"),
                "python": sys.version.split()[0],
                "executable": sys.executable,
            },
        )

    def op_journal(self, request_id: "typing.Any", request: "Message") -> None:
        """Start the events journal (past jobs first, then a sentinel, then new events)."""
        future = self.handle.rpc("job-manager.events-journal", {"full": True}, flags=self.constants.FLUX_RPC_STREAMING)
        self.keep.add(future)
        future.then(self._journal_response)
        self._answer(request_id, {})

    def _journal_response(self, future: "typing.Any") -> None:
        try:
            record = future.get()
        except OSError as exc:
            self.keep.discard(future)
            message = {"push": "journal-end"}  # type: Message
            message.update(_oserror(exc))
            _out(message)
            return
        _out({"push": "journal", "record": record})
        for event in record.get("events") or ():
            if event.get("name") in _ALLOCATION_EVENTS:
                self._resources_soon()
                break
        future.reset()

    def op_watch_resources(self, request_id: "typing.Any", request: "Message") -> None:
        """Push the resource state now and whenever it changes."""
        timer = self.handle.timer_watcher_create(0.0, self._resource_tick, repeat=RESOURCE_INTERVAL)
        timer.start()
        self.keep.add(timer)
        self._answer(request_id, {})

    def op_resources(self, request_id: "typing.Any", request: "Message") -> None:
        """Answer the resource state now (``{"sched": ..., "status": ...}``), e.g. after a drain."""
        self._read_resources(request_id)

    def _resources_soon(self) -> None:
        if self.soon is None:
            self.soon = self.handle.timer_watcher_create(RESOURCE_SOON, self._resource_soon_tick)
            self.soon.start()

    def _resource_soon_tick(
        self, handle: "typing.Any", watcher: "typing.Any", revents: int, args: "typing.Any" = None
    ) -> None:
        watcher.stop()
        self.soon = None
        self._read_resources()

    def _resource_tick(
        self, handle: "typing.Any", watcher: "typing.Any", revents: int, args: "typing.Any" = None
    ) -> None:
        self._read_resources()

    def _read_resources(self, request_id: "typing.Any" = None) -> None:
        """Read both resource states; answer ``request_id``, or push them if they changed."""
        pair = {}  # type: Message

        def got(future: "typing.Any", name: str) -> None:
            self.keep.discard(future)
            try:
                pair[name] = future.get()
            except OSError as exc:
                pair[name] = _oserror(exc)
            if len(pair) < 2:
                return
            failed = [value for value in pair.values() if "error" in value and "errno" in value]
            if request_id is not None:
                if failed:
                    answer = {"id": request_id, "ok": False}  # type: Message
                    answer.update(failed[0])
                    _out(answer)
                else:
                    self._answer(request_id, pair)
                return
            current = json.dumps(pair, sort_keys=True)
            if not failed and current != self.last_resources:
                self.last_resources = current
                _out({"push": "resources", "sched": pair["sched"], "status": pair["status"]})

        for name, topic in (("sched", "resource.sched-status"), ("status", "resource.status")):
            future = self.handle.rpc(topic, nodeid=0)
            self.keep.add(future)
            future.then(got, name)

    def op_submit(self, request_id: "typing.Any", request: "Message") -> None:
        """Submit ``jobspecs`` (JSON objects) asynchronously, in order; answer every id or error."""
        jobspecs = request["jobspecs"]
        urgency = int(request.get("urgency", 16))
        results = [None] * len(jobspecs)  # type: typing.List[typing.Any]
        remaining = [len(jobspecs)]

        def finish_one() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._answer(request_id, {"ids": results})

        def done(future: "typing.Any", index: int) -> None:
            self.keep.discard(future)
            try:
                results[index] = {"id": int(future.get_id())}
            except OSError as exc:
                results[index] = _oserror(exc)
            finish_one()

        if not jobspecs:
            self._answer(request_id, {"ids": []})
            return
        for index, jobspec in enumerate(jobspecs):
            try:
                future = self.job.submit_async(self.handle, json.dumps(jobspec), urgency=urgency)
            except OSError as exc:
                results[index] = _oserror(exc)
                finish_one()
                continue
            self.keep.add(future)
            future.then(done, index)

    def _each(self, request_id: "typing.Any", futures: "typing.List[typing.Tuple[int, typing.Any]]") -> None:
        """Answer ``{"done": n, "errors": [[id, errno, text], ...]}`` once every future is fulfilled."""
        done = [0]
        errors = []  # type: typing.List[typing.List[typing.Any]]
        remaining = [len(futures)]
        if not futures:
            self._answer(request_id, {"done": 0, "errors": []})
            return

        def finished(future: "typing.Any", job_id: int) -> None:
            self.keep.discard(future)
            try:
                future.get()
                done[0] += 1
            except OSError as exc:
                errors.append([job_id, exc.errno or 0, exc.strerror or str(exc)])
            remaining[0] -= 1
            if remaining[0] == 0:
                self._answer(request_id, {"done": done[0], "errors": errors})

        for job_id, future in futures:
            self.keep.add(future)
            future.then(finished, job_id)

    def op_cancel(self, request_id: "typing.Any", request: "Message") -> None:
        """Cancel the jobs ``ids`` (pending or running) with ``reason``."""
        reason = request.get("reason") or None
        self._each(request_id, [(i, self.job.cancel_async(self.handle, i, reason)) for i in request["ids"]])

    def op_raise(self, request_id: "typing.Any", request: "Message") -> None:
        """Raise an exception of ``type`` with ``note`` on the jobs ``ids``; ``severity`` 0 (the default) is
        fatal: a running job is killed and ends with that exception in its eventlog."""
        topic = "job-manager.raise"
        payload = {
            "severity": int(request.get("severity", 0)),
            "type": request["type"],
            "note": request.get("note", ""),
        }
        self._each(request_id, [(i, self.handle.rpc(topic, dict(payload, id=i))) for i in request["ids"]])

    def op_urgency(self, request_id: "typing.Any", request: "Message") -> None:
        """Set the urgency of the jobs ``ids`` (0 holds a pending job)."""
        urgency = int(request["urgency"])
        topic = "job-manager.urgency"
        self._each(request_id, [(i, self.handle.rpc(topic, {"id": i, "urgency": urgency})) for i in request["ids"]])

    def op_drain(self, request_id: "typing.Any", request: "Message") -> None:
        """Drain ``ranks`` (an idset) with ``reason``; a rank already drained keeps its reason."""
        payload = {"targets": request["ranks"], "reason": request["reason"], "mode": "update"}
        self._rpc(request_id, "resource.drain", payload)

    def op_undrain(self, request_id: "typing.Any", request: "Message") -> None:
        """Undrain ``ranks`` (an idset): each must be drained."""
        self._rpc(request_id, "resource.undrain", {"targets": request["ranks"]})

    def _rpc(self, request_id: "typing.Any", topic: str, payload: "Message") -> None:
        future = self.handle.rpc(topic, payload, nodeid=0)
        self.keep.add(future)

        def answered(future: "typing.Any") -> None:
            self.keep.discard(future)
            try:
                self._answer(request_id, future.get() or {})
            except OSError as exc:
                _out(_failure(request_id, exc))

        future.then(answered)


def _fatal(text: str, code: int = 0) -> int:
    _out({"push": "fatal", "errno": code, "error": text})
    return 1


def main() -> int:
    """Connect to the broker at ``FLUX_URI`` and serve until stdin ends; 1 if Flux cannot be used."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sidecar decides when the helper stops
    try:
        import flux
    except ImportError as exc:
        return _fatal("the flux bindings are not importable by " + sys.executable + " (" + str(exc) + ")")
    try:
        helper = Helper(flux)
    except OSError as exc:
        where = os.environ.get("FLUX_URI") or "the default broker (FLUX_URI is not set)"
        return _fatal("cannot connect to Flux at " + where + ": " + (exc.strerror or str(exc)), exc.errno or 0)
    try:
        helper.run()
    except OSError as exc:
        return _fatal("the broker connection failed: " + (exc.strerror or str(exc)), exc.errno or 0)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the sidecar went away first
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(errno.EINTR)
