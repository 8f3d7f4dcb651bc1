"""``ensemble nats-replicas N``: change the replica count of every stream and bucket, explicitly.

The services create streams and buckets with ``ENSEMBLE_NATS_REPLICAS`` replicas and refuse to start
against existing ones with another count (``natsio.ReplicasChanged``): that is never changed silently.
This command is the one way to change it. Without ``--apply`` it only shows what it would do; with it,
each stream is updated in turn and waited on until all its replicas are current, so going from 1 to 3
after moving to a three-node cluster (or back) keeps every message. Then set ``ENSEMBLE_NATS_REPLICAS``
to the same number and restart the services. It needs a NATS user that may update streams (the
services' users may not): run it with the server's system or admin credentials in the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import nats
import nats.errors
import nats.js.errors

from ensemble_core import natsio
from ensemble_core.settings import SettingsError, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("replicas", type=int, choices=range(1, 6), metavar="N", help="replicas wanted (1 to 5)")
    parser.add_argument("--apply", action="store_true", help="change the streams (default: only show what differs)")
    parser.add_argument("--nats", metavar="URL", help="NATS server URL(s) (default: ENSEMBLE_NATS_URL)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each stream's replicas")


async def change(url: str, replicas: int, apply: bool, timeout: float) -> list[natsio.ReplicaChange]:
    """Connect (failing fast when NATS is not there) and run :func:`natsio.set_replicas`."""
    nc = await nats.connect(
        servers=[part.strip() for part in url.split(",")],
        name="nats-replicas",
        connect_timeout=5,
        allow_reconnect=False,
    )
    try:
        return await natsio.set_replicas(nc.jetstream(), replicas, apply=apply, timeout=timeout)
    finally:
        await nc.close()


def run(args: argparse.Namespace) -> int:
    """Print each stream's replicas before and after; exit 0, 1 if some differ without ``--apply``, 2 on a
    bad setting, 3 if NATS refused or failed."""
    try:
        settings = load(nats_url=args.nats) if args.nats else load()
    except SettingsError as exc:
        print(f"ensemble nats-replicas: {exc}", file=sys.stderr)
        return 2
    try:
        changes = asyncio.run(change(settings.nats_url, args.replicas, args.apply, args.timeout))
    except (OSError, TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        print(f"ensemble nats-replicas: {settings.nats_url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 3
    differ = 0
    for item in changes:
        if item.changed:
            print(f"{item.stream}: {item.before} -> {item.after} replicas")
        elif item.before == args.replicas:
            print(f"{item.stream}: {item.before} replicas (unchanged)")
        else:
            differ += 1
            print(f"{item.stream}: {item.before} replicas (would become {args.replicas}; run again with --apply)")
    if not changes:
        print("no streams yet: the services create them with ENSEMBLE_NATS_REPLICAS replicas")
    if not differ and args.apply:
        print(f"now set ENSEMBLE_NATS_REPLICAS={args.replicas} for the services and restart them")
    return 1 if differ else 0
