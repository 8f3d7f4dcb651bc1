"""Per-ensemble sidecar tokens derived from one operator secret.

The creator, poller and actuator share one secret (``ENSEMBLE_SIDECAR_TOKEN``). A sidecar never sees it:
it gets the token of its own ensemble, ``HMAC-SHA256(secret, "<namespace>/<ensemble>")``, which the
services derive again when they call it. A sidecar's token is useless against another ensemble's
sidecar, and no service needs to read a per-ensemble Secret back from Kubernetes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def ensemble_token(secret: str, namespace: str, ensemble: str) -> str:
    """The bearer token of the sidecars of one ensemble (empty when ``secret`` is empty: no auth)."""
    if not secret:
        return ""
    digest = hmac.new(secret.encode(), f"{namespace}/{ensemble}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
