"""What every route shares: the context, bearer-token checks, JSON errors, bounded bodies."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lora_pipeline.api.dagster_client import DagsterClient, DagsterError
from lora_pipeline.api.signed_urls import UrlSigner
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.registry.version_refs import UnknownVersionRef
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.webhook.app import BodyTooLarge, read_limited

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ApiConfig:
    """What the app needs beyond the store and Dagster (from the settings, in `api serve`)."""

    token: str
    admin_token: str | None = None
    webhook_secret: str | None = None
    public_url: str | None = None
    upload_ttl: timedelta = timedelta(hours=24)
    primary: str = "kohya"
    local_store: bool = False  # serve upload and download URLs itself (no presigning)
    version_wait_s: float = 20.0  # how long a training POST waits to answer with the version
    pump_interval_s: float = 5.0  # seconds between callback passes (0: no pump thread)


@dataclass(frozen=True)
class Api:
    """What a handler works with: the store, its registry, Dagster, the URL signer, the config."""

    store: ObjectStore
    dagster: DagsterClient
    config: ApiConfig
    registry: RegistryStore = field(init=False)
    signer: UrlSigner = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "registry", RegistryStore(self.store, primary=self.config.primary))
        object.__setattr__(self, "signer", UrlSigner(self.config.token))

    def external_url(self, request: Request, path: str) -> str:
        """``path`` under the API's public URL (LORA_API_PUBLIC_URL, else the request's)."""
        return (self.config.public_url or str(request.base_url)).rstrip("/") + path


class ApiError(Exception):
    """An answer other than 2xx: its status, its message, and extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


Handler = Callable[[Api, Request], Awaitable[Response]]


@dataclass(frozen=True)
class RouteSpec:
    path: str
    method: str
    handler: Handler
    auth: bool = True  # False: /healthz and the signed file URLs
    admin: bool = False  # promote, rollback, delete


def authorize(config: ApiConfig, request: Request, *, admin: bool) -> None:
    """Check the bearer token (constant-time); ApiError 401/403 naming what is missing."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "missing bearer token: send Authorization: Bearer <LORA_API_TOKEN>")
    given = value.strip().encode()
    if admin:
        if not config.admin_token:
            raise ApiError(403, "admin operations are off: the server has no LORA_API_ADMIN_TOKEN")
        if not hmac.compare_digest(given, config.admin_token.encode()):
            raise ApiError(403, "this operation needs the admin token (LORA_API_ADMIN_TOKEN)")
    elif not any(hmac.compare_digest(given, t.encode()) for t in (config.token, config.admin_token) if t):
        raise ApiError(401, "wrong bearer token")


def make_route(api: Api, spec: RouteSpec) -> Route:
    """The Starlette route: authentication, the handler, and a JSON error for each failure kind."""

    async def endpoint(request: Request) -> Response:
        try:
            if spec.auth:
                authorize(api.config, request, admin=spec.admin)
            return await spec.handler(api, request)
        except ApiError as exc:
            return error_response(exc.status, str(exc), **exc.extra)
        except InvalidStyleName as exc:
            return error_response(400, str(exc))
        except UnknownVersionRef as exc:
            return error_response(404, str(exc))
        except DagsterError as exc:
            return error_response(502, str(exc))
        except StorageError as exc:
            log.warning("%s %s: store failed: %s", spec.method, spec.path, exc)
            return error_response(503, f"the store failed; try again: {exc}")

    endpoint.__doc__ = spec.handler.__doc__  # the OpenAPI document reads it
    endpoint.__name__ = spec.handler.__name__
    return Route(spec.path, endpoint, methods=[spec.method])


def style_of(request: Request) -> str:
    return validate_style(request.path_params["style"])


def unrouted(request: Request) -> tuple[int, str]:
    """Why no route matched: most often a style name with a '/' (encoded or not) in it."""
    raw = request.scope.get("raw_path", b"").decode("latin-1")
    if raw.startswith("/v1/styles/"):
        segment = unquote(raw[len("/v1/styles/") :].split("/", 1)[0])
        try:
            validate_style(segment)
        except InvalidStyleName as exc:
            return 400, str(exc)
        return 404, f"no route {request.method} {request.url.path}: a style name is one path segment (no '/')"
    return 404, f"no route {request.method} {request.url.path} (GET /openapi.json lists them)"


def check_webhook_url(value: Any) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(422, f"webhook: expected an http(s) URL with a host, got {value!r}")
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: {value} is not between {low} and {high}")
    return value


async def json_body(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, at most MAX_JSON_BYTES; 400/413 naming what is wrong."""
    data = await read_exactly(request, MAX_JSON_BYTES, exact=False)
    if not data.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "expected a JSON object body")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object body")
    return value


async def read_exactly(request: Request, limit: int, *, exact: bool = True) -> bytes:
    """The body: at most ``limit`` bytes (413 past it, read no further); with ``exact``, exactly."""
    try:
        data = await read_limited(request, limit)
    except BodyTooLarge:
        raise ApiError(413, f"body is over the {limit:,}-byte limit") from None
    if exact and len(data) != limit:
        raise ApiError(400, f"body is {len(data):,} bytes; this URL is signed for exactly {limit:,}")
    return data
