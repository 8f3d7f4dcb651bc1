"""The secrets of a container stack (``docker-compose.yml``), each written where only its user mounts it.

``python -m ensemble_cli.stack_secrets ROOT ENSEMBLE_FILE [NAMESPACE]`` writes, once (a restarted stack
keeps what its running parts were given), under ``ROOT``:

* ``operator/operator-secret`` — the operator secret: the creator's and the actuator's only;
* ``sidecar/token`` — the token of the ensemble in ``ENSEMBLE_FILE``, derived from that secret: the
  sidecars', who never see the secret itself;
* ``nats/auth.conf`` — the NATS server's users (``ensemble_core.natsauth``, production's permissions),
  with a password made for the stack per service: the NATS server's;
* ``nats-<service>/password`` — each service's own NATS password: that service's only;
* ``nats-reader/password`` — the password of the ``reader`` user, who may read the streams' info and
  messages (for a person looking at the stack, or its test): it stays in its volume, mounted by nobody.

In the compose file each directory is a volume of its own, mounted into those containers and no others.
Files are 0600 but ``nats/auth.conf``, which the NATS image's user must read (only the NATS container
mounts it).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from ensemble_core import natsauth
from ensemble_core.spec import load
from ensemble_core.tokens import ensemble_token


def _write_once(path: Path, text: str, mode: int = 0o600) -> str:
    """Write ``text`` to a new ``path`` (mode ``mode``); an existing file is kept: return what it holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return path.read_text()
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return text


def write(root: Path, ensemble_file: str, namespace: str = "default") -> None:
    """Write every secret of the stack under ``root`` (see the module docstring)."""
    secret = _write_once(root / "operator" / "operator-secret", secrets.token_urlsafe(32))
    ensemble = load(ensemble_file, namespace)
    _write_once(root / "sidecar" / "token", ensemble_token(secret, ensemble.namespace, ensemble.name))
    passwords = {
        service: _write_once(root / f"nats-{service}" / "password", secrets.token_hex(24))
        for service in natsauth.SERVICES
    }
    reader = _write_once(root / "nats-reader" / "password", secrets.token_hex(24))
    _write_once(root / "nats" / "auth.conf", natsauth.authorization(passwords, reader=reader), mode=0o644)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``ROOT ENSEMBLE_FILE [NAMESPACE]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m ensemble_cli.stack_secrets ROOT ENSEMBLE_FILE [NAMESPACE]", file=sys.stderr)
        return 2
    write(Path(args[0]), args[1], *args[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
