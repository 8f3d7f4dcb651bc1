"""List and watch one kind of Kubernetes object, the way controllers do it, and keep the answers in a cache.

:class:`Watcher` lists the objects (remembering the list's ``resourceVersion``), then watches from that
version, applying each ``ADDED`` / ``MODIFIED`` / ``DELETED`` event to its cache and calling
``on_change(obj)`` for it; ``BOOKMARK`` events only move the version on. It lists again

* when the API answers 410 Gone (the version is too old: the events in between are lost), at once;
* every ``resync`` seconds (the watch is opened with that server-side timeout, and ended by the client
  then if the server did not): a safety net that also calls ``on_change`` for every object, so a
  missed event costs at most one period;
* after any other failure, with exponential backoff — and after a 429 no sooner than its ``Retry-After``.

The official client's watch is a blocking generator, so it runs in a daemon thread that hands events to
the event loop; stopping shuts its socket down (``Watch.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from ensemble_core.kube import Kube, KubeError, Obj, retry_after

log = logging.getLogger(__name__)

Key = tuple[str, str]
#: First and longest wait after a failed list or watch.
BACKOFF = (0.5, 30.0)
_DONE = object()


def key_of(obj: Obj) -> Key:
    """``(namespace, name)`` of an object."""
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


class Watcher:
    """One kind of object listed, then watched (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        what: str,
        list_call: Callable[..., Any],
        *args: Any,
        on_change: Callable[[Obj], None] | None = None,
        resync: float = 300.0,
        **kwargs: Any,
    ) -> None:
        """Watch what ``list_call(*args, **kwargs)`` lists (a list call of the official client)."""
        self.kube = kube
        self.what = what
        self.list_call = list_call
        self.args = args
        self.kwargs = kwargs
        self.on_change = on_change
        self.resync = resync
        self.cache: dict[Key, Obj] = {}
        self.synced = asyncio.Event()
        self.lists = 0
        self.version = ""

    def get(self, namespace: str, name: str) -> Obj | None:
        """The cached object, or None."""
        return self.cache.get((namespace, name))

    async def run(self, stop: asyncio.Event) -> None:
        """List and watch until ``stop`` is set."""
        delay = BACKOFF[0]
        while not stop.is_set():
            try:
                await self._list()
                delay = BACKOFF[0]
                await self._watch(stop)
                continue
            except KubeError as exc:
                wait = max(delay, exc.retry_after or 0.0)
                log.warning("%s: %s; listing again in %.1f s", self.what, exc, wait)
            except _Gone:
                log.info("%s: watch expired (410 Gone); listing again", self.what)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            delay = min(2 * delay, BACKOFF[1])

    async def _list(self) -> None:
        listing = await self.kube.call(f"list {self.what}", self.list_call, *self.args, **self.kwargs)
        raw: Obj = listing if isinstance(listing, dict) else self.kube.api.sanitize_for_serialization(listing)
        self.lists += 1
        self.version = str((raw.get("metadata") or {}).get("resourceVersion") or "")
        fresh = {key_of(item): item for item in raw.get("items") or []}
        gone = [obj for key, obj in self.cache.items() if key not in fresh]
        self.cache = fresh
        self.synced.set()
        for obj in [*fresh.values(), *gone]:
            self._changed(obj)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Apply watch events until the watch ends (resync timeout), expires (:class:`_Gone`) or fails."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        kwargs = dict(self.kwargs, timeout_seconds=max(1, int(self.resync)), allow_watch_bookmarks=True)
        if self.version and self.version != "...":
            kwargs["resource_version"] = self.version

        def pump() -> None:
            try:
                for event in watch.stream(self.list_call, *self.args, **kwargs):  # type: ignore[no-untyped-call]
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except BaseException as exc:  # handed to the loop, which decides
                loop.call_soon_threadsafe(events.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _DONE)

        threading.Thread(target=pump, name=f"watch {self.what}", daemon=True).start()
        stopping = asyncio.ensure_future(stop.wait())
        # the server is asked to end the watch after resync seconds; not every one (or every proxy) does
        deadline = loop.time() + self.resync
        try:
            while True:
                getting = asyncio.ensure_future(events.get())
                await asyncio.wait(
                    {getting, stopping}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                if not getting.done():
                    getting.cancel()
                    return
                item = getting.result()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    self._fail(item)
                    return
                self._apply(item)
        finally:
            stopping.cancel()
            watch.stop()  # type: ignore[no-untyped-call]

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, k8s.ApiException):
            if exc.status == 410:
                raise _Gone
            status = int(exc.status or 0)
            raise KubeError(
                f"watch {self.what}: {exc.reason} (HTTP {status})",
                status=status,
                transient=True,
                retry_after=retry_after(exc),
            )
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError | ValueError):
            raise KubeError(f"watch {self.what}: {exc}", status=0, transient=True)
        raise exc

    def _apply(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("raw_object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            return
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.version = str(version)
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            self.cache.pop(key_of(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            self.cache[key_of(obj)] = obj
        else:
            return
        self._changed(obj)

    def _changed(self, obj: Obj) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(obj)
        except Exception:
            log.exception("%s: change handler failed", self.what)


class _Gone(Exception):
    """The watch's resourceVersion expired: list again."""
