"""The app's HTTP API: a Starlette app over the store, the registry and the Dagster instance.

Every route but ``/healthz`` and the signed file URLs wants ``Authorization: Bearer
<LORA_API_TOKEN>``; promote, rollback and delete want LORA_API_ADMIN_TOKEN's token. Each
error is ``{"error": "<what is wrong>", "status": <code>}``. The work is done by the code
the CLI and the jobs run: ``complete`` is ``dataset add``'s ingest, a training is a
``train_lora`` run launched through Dagster's GraphQL, promote/rollback/delete are the
registry's ``move_alias``/``delete_version``. docs/api.md walks through it with curl.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.schemas import SchemaGenerator

from lora_pipeline.api import training_routes, upload_routes, version_routes
from lora_pipeline.api.dagster_client import DagsterClient
from lora_pipeline.api.http import Api, ApiConfig, RouteSpec, error_response, make_route, unrouted
from lora_pipeline.lifecycle.callbacks import CallbackPump
from lora_pipeline.storage.base import ObjectStore

log = logging.getLogger(__name__)

__all__ = ["ApiConfig", "create_app"]


async def openapi(api: Api, request: Request) -> Response:
    """The OpenAPI document of this API.
    ---
    summary: OpenAPI document
    responses: {200: {description: this document}}
    """
    schemas = SchemaGenerator({"openapi": "3.0.3", "info": {"title": "lora_pipeline API", "version": "1"}})
    document = schemas.get_schema(routes=request.app.routes)
    document["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    document["security"] = [{"bearer": []}]
    return JSONResponse(document)


async def healthz(api: Api, request: Request) -> Response:
    """Liveness (no token).
    ---
    summary: Health
    responses: {200: {description: ok}}
    """
    return JSONResponse({"status": "ok", "store": api.store.describe(), "dagster": api.dagster.url})


SERVICE_ROUTES = [RouteSpec("/openapi.json", "GET", openapi), RouteSpec("/healthz", "GET", healthz, auth=False)]


def create_app(store: ObjectStore, dagster: DagsterClient, config: ApiConfig) -> Starlette:
    """The ASGI app; with a webhook secret and ``pump_interval_s`` its lifespan runs the callback pump."""
    api = Api(store, dagster, config)
    specs = [*upload_routes.ROUTES, *training_routes.ROUTES, *version_routes.ROUTES, *SERVICE_ROUTES]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = None
        if config.webhook_secret and config.pump_interval_s > 0:
            pump = callback_pump(store, dagster, config)
            thread = threading.Thread(target=_pump_loop, args=(pump, stop, config.pump_interval_s), daemon=True)
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(30)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(*unrouted(request))
        return error_response(exc.status_code, str(exc.detail))

    return Starlette(
        routes=[make_route(api, spec) for spec in specs],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )


def callback_pump(store: ObjectStore, dagster: DagsterClient, config: ApiConfig) -> CallbackPump:
    """The pump the API server runs: Dagster for run facts, httpx for the POSTs."""
    assert config.webhook_secret
    client = httpx.Client(timeout=10.0, follow_redirects=False)

    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        return client.post(url, content=body, headers=headers).status_code

    return CallbackPump(store, config.webhook_secret, run_facts=dagster.run_facts, post=post, primary=config.primary)


def _pump_loop(pump: CallbackPump, stop: threading.Event, interval: float) -> None:
    """A pass every ``interval`` seconds until ``stop``: callbacks wait while this process is down."""
    while not stop.is_set():
        try:
            report = pump.run_once()
            for problem in report.problems:
                log.warning(problem)
            for message in report.delivered:
                log.info("callback %s delivered", message)
        except Exception:  # noqa: BLE001 - Dagster unreachable and the like: the next pass retries
            log.exception("callback pass failed; retrying in %.0f s", interval)
        stop.wait(interval)
