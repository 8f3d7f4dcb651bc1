"""What a process holding secrets does first: it becomes non-dumpable.

Linux lets any process of the same user read another's ``/proc/<pid>/environ`` and attach to it with
ptrace — so a job the local sidecar runs (its child, the same user) could read the sidecar's token, and any
process of the user who ran ``ensemble up`` the services' NATS passwords and the operator secret. A
non-dumpable process's ``/proc`` entries belong to root and it cannot be attached to by the same user
(``prctl(PR_SET_DUMPABLE, 0)``; its children are dumpable again once they exec, as jobs should be). Root,
and core dumps, are the price: a crashed service leaves no core.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def make_private() -> bool:
    """Make this process non-dumpable where the system allows it; True if it now is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("could not make the process non-dumpable (errno %d)", ctypes.get_errno())
            return False
        return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError) as exc:
        log.warning("could not make the process non-dumpable: %s", exc)
        return False
