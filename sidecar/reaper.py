"""Kills a local sidecar's jobs when the sidecar dies, however it dies (``kill -9`` included).

Each job of the local backend runs in a process group of its own (its own session), so that the whole
job — its children too — can be killed. A sidecar that exits cleanly kills them itself; one killed
with SIGKILL cannot, and its jobs would run on with nobody to report them, while the operator queues
them again as lost: the same job would then run twice. So each local sidecar starts this process
(``python -m sidecar.reaper``) and tells it, on its standard input, every job process group it starts
(``+<pgid>``) and every one that ended (``-<pgid>``). When that input ends — the sidecar is gone, the
kernel closed its end of the pipe — the reaper kills every group it still holds with SIGKILL, and exits.

It ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole terminal's process group: the reaper must
outlive the sidecar it watches, not die first). A group that ended in the instant before the sidecar
died may not have been struck off; its id could in principle be reused by then — the window is the
few microseconds between a job's end and the sidecar's next write.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import IO


def main() -> int:
    """Read ``+pgid`` / ``-pgid`` lines until end of input, then kill the groups left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if len(line) < 2 or not line[1:].isdigit():
            continue
        pgid = int(line[1:])
        if line[0] == "+":
            groups.add(pgid)
        elif line[0] == "-":
            groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    return 0


class Reaper:
    """The sidecar's end: starts the reaper and tells it the job process groups (best effort: a reaper
    that cannot be started or has died only loses this protection, and says so once in the log)."""

    def __init__(self) -> None:
        self._pipe: IO[str] | None = None
        self._process: subprocess.Popen[str] | None = None
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sidecar.reaper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                # not in the jobs' groups, nor in the sidecar's: a kill of the sidecar's group spares it
                start_new_session=True,
            )
            self._pipe = self._process.stdin
        except OSError as exc:
            self.problem = f"cannot start the job reaper: {exc}"
        else:
            self.problem = ""

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line + "\n")
            self._pipe.flush()
        except (OSError, ValueError) as exc:
            self.problem = f"the job reaper is gone: {exc}"
            self._pipe = None

    def add(self, pgid: int) -> None:
        """A job's process group started."""
        self._send(f"+{pgid}")

    def remove(self, pgid: int) -> None:
        """A job's process group ended."""
        self._send(f"-{pgid}")

    def close(self) -> None:
        """The sidecar is stopping (its jobs already killed): end the reaper."""
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            self._process = None


if __name__ == "__main__":
    sys.exit(main())
