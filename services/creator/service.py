"""The creator: in local mode, registers each member of an Ensemble file with its sidecar endpoint.

With ``ENSEMBLE_MODE=kubernetes`` it reconciles Ensemble resources instead (``services/creator/kubernetes.py``).

For every member it writes the ``MemberSpec`` to the ``ensemble-members`` bucket with KV ``create``
(so a restart registers nothing twice and never overwrites a record the actuator already changed),
then publishes the member's ``ready`` event with a deterministic ``Nats-Msg-Id``. It then idles
until it is told to stop: in local mode the sidecars are started by ``ensemble up`` (the role the
Flux Operator plays in Kubernetes).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import KeyWrongLastSequenceError

from ensemble_core import natsio, subjects
from ensemble_core.messages import MemberEvent, encode
from ensemble_core.settings import Settings, SettingsError, env_name, parse_endpoints
from ensemble_core.spec import load
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token
from services.creator import kubernetes

log = logging.getLogger("creator")


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Register the members of ``settings.file`` (or, in Kubernetes mode, reconcile Ensembles) until ``stop``."""
    stop = stop or asyncio.Event()
    if settings.mode == "kubernetes":
        natsio.stop_on_signals(stop)
        await kubernetes.run(settings, stop)
        return
    if not settings.file:
        raise SettingsError(f"{env_name('file')}: required in local mode; set it to the Ensemble file to run")
    ensemble = load(settings.file, settings.namespace)
    endpoints = parse_endpoints(settings.endpoints)
    missing = [m.index for m in ensemble.members if m.index not in endpoints]
    if missing:
        raise SettingsError(f"{env_name('endpoints')}: no sidecar endpoint for member(s) {missing}")
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "creator")
    try:
        js = nc.jetstream()
        await natsio.declare(js, settings)
        members = await natsio.bucket(js, subjects.MEMBERS_BUCKET)
        for member in ensemble.members:
            address = MemberAddress(ensemble.namespace, ensemble.name, member.index)
            readonly = status_token(ensemble_token(settings.sidecar_token, ensemble.namespace, ensemble.name))
            record = ensemble.member_spec(member, endpoints[member.index], created=time.time(), status_token=readonly)
            try:
                await members.create(address.key, encode(record))
                log.info("registered member", extra={"member": str(address), "endpoint": record.endpoint})
            except KeyWrongLastSequenceError:
                log.info("member already registered", extra={"member": str(address)})
            event = MemberEvent(
                namespace=address.namespace,
                ensemble=address.ensemble,
                member=address.member,
                event="ready",
                time=time.time(),
                size=member.size,
                message=f"sidecar at {record.endpoint}",
            )
            await js.publish(subjects.events(address), encode(event), headers={"Nats-Msg-Id": f"{address.key}:ready"})
        await stop.wait()
    finally:
        await nc.drain()
