"""Per-ensemble sidecar tokens derived from one operator secret.

The creator, poller and actuator share one secret (``ENSEMBLE_SIDECAR_TOKEN``). A sidecar never sees it:
it gets the token of its own ensemble, ``HMAC-SHA256(secret, "<namespace>/<ensemble>")``, which the
services derive again when they call it. A sidecar's token is useless against another ensemble's
sidecar, and no service needs to read a per-ensemble Secret back from Kubernetes.

From an ensemble's token follows its **status token**, ``HMAC-SHA256(token, "status")``, which opens only
``RequestStatus`` and ``WatchStatus``. The creator writes it into each member record, so the poller
reads sidecars with it and needs no operator secret: a poller taken over cannot submit jobs or scale.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def status_token(token: str) -> str:
    """The read-only token of the sidecars whose token is ``token`` (empty when ``token`` is empty)."""
    if not token:
        return ""
    digest = hmac.new(token.encode(), b"status", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def ensemble_token(secret: str, namespace: str, ensemble: str) -> str:
    """The bearer token of the sidecars of one ensemble (empty when ``secret`` is empty: no auth)."""
    if not secret:
        return ""
    digest = hmac.new(secret.encode(), f"{namespace}/{ensemble}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
