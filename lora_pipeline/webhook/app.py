"""The webhook receiver: RunPod POSTs a status body, we store it, then answer.

It does as little as possible, because RunPod gives a webhook three tries 10 s
apart and then drops it: check the token, check the size and shape, write the
body to the inbox, answer. The registry update happens later, in the sensor that
reads the inbox. The one promise: a 200 means the body is durably in the store;
anything else (503 when the store fails) makes RunPod deliver again. Bad requests
(401 wrong token, 413 too large, 400 not a status body, 408 a body not received within
BODY_READ_TIMEOUT_S) write nothing.
"""

from __future__ import annotations

import hmac
import logging

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.webhook.inbox import MAX_BODY_BYTES, InvalidWebhook, parse_webhook_body, write_webhook
from lora_pipeline.webhook.urls import WEBHOOK_PATH

log = logging.getLogger(__name__)


# A body that has not fully arrived this long after its headers is dropped (408): a client
# holding a connection open with a partial body (slowloris) costs a socket for this long only.
BODY_READ_TIMEOUT_S = 10.0


class _TooLarge(Exception):
    pass


def create_app(
    store: ObjectStore,
    token: str | None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S,
) -> Starlette:
    """The ASGI app. ``token`` None accepts any caller (only for --insecure-no-token)."""
    expected = token.encode() if token else None

    async def receive_webhook(request: Request) -> JSONResponse:
        if expected is not None:
            given = request.query_params.get("token", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        try:
            with anyio.fail_after(body_read_timeout_s):
                body = await _read_limited(request, max_body_bytes)
        except _TooLarge:
            return JSONResponse({"error": f"body over the {max_body_bytes}-byte limit"}, status_code=413)
        except TimeoutError:
            return JSONResponse(
                {"error": f"body not received within {body_read_timeout_s:g} s"},
                status_code=408,
                headers={"Connection": "close"},
            )
        try:
            decoded = parse_webhook_body(body)
        except InvalidWebhook as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            key = await run_in_threadpool(write_webhook, store, body)
        except Exception as exc:  # noqa: BLE001 - any store failure: make RunPod deliver again
            log.error("webhook for job %s not stored: %s", decoded["id"], exc)
            return JSONResponse(
                {"error": "could not store the webhook; deliver again"},
                status_code=503,
                headers={"Retry-After": "10"},
            )
        log.info("webhook job=%s status=%s %s", decoded["id"], decoded["status"], key or "duplicate")
        return JSONResponse({"stored": key is not None, "key": key, "id": decoded["id"]})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "store": store.describe()})

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _TooLarge
        except ValueError:
            pass
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)
