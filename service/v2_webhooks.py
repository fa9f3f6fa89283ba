"""GET /v2/webhook-secret: the caller's secret for checking its job callbacks' signatures."""

from __future__ import annotations

from flask import Blueprint

from worker.contract import webhooks

from .auth import current_owner
from .context import convq

bp = Blueprint("v2_webhooks", __name__, url_prefix="/v2")


@bp.get("/webhook-secret")
def webhook_secret():
    """The secret signing the caller's callbacks (one per API key; one for all with auth off)."""
    ext = convq()
    server = webhooks.server_secret(ext.redis, ext.settings.webhook_secret)
    return {
        "secret": webhooks.key_secret(server, current_owner()),
        "algorithm": "HMAC-SHA256",
        "header": webhooks.SIGNATURE_HEADER,
        "signed": "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + raw body)>",
    }
