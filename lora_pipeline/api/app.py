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
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from lora_pipeline.api.dagster_client import DagsterClient, DagsterError
from lora_pipeline.api.datasets import dataset_zip_chunks
from lora_pipeline.api.signed_urls import BadToken, Grant, UrlSigner
from lora_pipeline.contracts.run_tags import API_TRAINING_TAG
from lora_pipeline.dataset.ingest import IngestOptions
from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.lifecycle.callbacks import CallbackPump, new_training_id, save_watch, watch_training
from lora_pipeline.lifecycle.submit import training_params
from lora_pipeline.lifecycle.uploads import (
    DeclaredFile,
    IncompleteUpload,
    UnknownUpload,
    UploadClosed,
    UploadRefused,
    complete_upload,
    create_upload,
    missing_files,
    read_upload,
)
from lora_pipeline.registry.aliases import AliasAction, validate_alias
from lora_pipeline.registry.models import InvalidRecord, RegistryDocument, VersionStatus
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.registry.version_refs import UnknownVersionRef, resolve_version_ref
from lora_pipeline.registry_store.documents import Refused, RegistryStore
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.webhook.app import BodyTooLarge, read_limited

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 1024 * 1024
DEFAULT_URL_EXPIRY_S = 3600
LAYOUTS = ("kohya", "diffusers")


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


Handler = Callable[[Request], Awaitable[Response]]


def create_app(store: ObjectStore, dagster: DagsterClient, config: ApiConfig) -> Starlette:
    """The ASGI app; with a webhook secret and ``pump_interval_s`` its lifespan runs the callback pump."""
    registry = RegistryStore(store, primary=config.primary)
    signer = UrlSigner(config.token)
    tokens = [t.encode() for t in (config.token, config.admin_token) if t]
    admin = config.admin_token.encode() if config.admin_token else None

    def authorized(request: Request, *, needs_admin: bool) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "missing bearer token: send Authorization: Bearer <LORA_API_TOKEN>")
        candidate = value.strip().encode()
        if needs_admin:
            if admin is None:
                raise ApiError(403, "admin operations are off: the server has no LORA_API_ADMIN_TOKEN")
            if not hmac.compare_digest(candidate, admin):
                raise ApiError(403, "this operation needs the admin token (LORA_API_ADMIN_TOKEN)")
        elif not any(hmac.compare_digest(candidate, t) for t in tokens):
            raise ApiError(401, "wrong bearer token")

    def route(path: str, method: str, *, auth: bool = True, needs_admin: bool = False):
        """Register ``fn``: authentication, then its JSON errors for every failure kind."""

        def wrap(fn: Handler) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    if auth:
                        authorized(request, needs_admin=needs_admin)
                    return await fn(request)
                except ApiError as exc:
                    return error_response(exc.status, str(exc), **exc.extra)
                except (InvalidStyleName, UnknownVersionRef) as exc:
                    return error_response(404 if isinstance(exc, UnknownVersionRef) else 400, str(exc))
                except DagsterError as exc:
                    return error_response(502, str(exc))
                except StorageError as exc:
                    log.warning("%s %s: store failed: %s", method, path, exc)
                    return error_response(503, f"the store failed; try again: {exc}")

            endpoint.__doc__ = fn.__doc__
            endpoint.__name__ = fn.__name__
            return Route(path, endpoint, methods=[method])

        return wrap

    routes: list[Route] = []

    def style_of(request: Request) -> str:
        return validate_style(request.path_params["style"])

    def external_url(request: Request, path: str) -> str:
        base = (config.public_url or str(request.base_url)).rstrip("/")
        return base + path

    # -- uploads ----------------------------------------------------------------------------

    async def create_upload_route(request: Request) -> Response:
        """Declare the files of a new dataset version; one PUT URL per file.
        ---
        summary: Start an upload
        requestBody: {content: {application/json: {example: {files: [{name: a.png, size: 1234, contentType: image/png}]}}}}
        responses:
          201: {description: "uploadId, expiresAt and per file its url, method and the headers to send"}
          400: {description: a file name, type or size the ingest could never accept (named)}
        """
        style = style_of(request)
        body = await json_body(request)
        raw = body.get("files")
        if not isinstance(raw, list):
            raise ApiError(400, "files: expected a list of {name, size, contentType}")
        try:
            declared = [DeclaredFile(str(f["name"]), int(f["size"]), str(f["contentType"])) for f in raw]
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "files: each entry needs name (text), size (bytes) and contentType") from None
        try:
            record = await run_in_threadpool(create_upload, store, style, declared, ttl=config.upload_ttl)
        except UploadRefused as exc:
            raise ApiError(413 if "bytes" in str(exc) else 400, str(exc)) from None
        expires = datetime.fromisoformat(record.expires_at)
        seconds = max(1, int((expires - datetime.now(UTC)).total_seconds()))
        files = []
        for f in record.files:
            headers = {"Content-Type": f.content_type, "Content-Length": str(f.size)}
            url = await run_in_threadpool(put_url, request, record.key(f.name), f, seconds)
            files.append({"name": f.name, "method": "PUT", "url": url, "headers": headers})
        answer = {"uploadId": record.id, "style": style, "expiresAt": record.expires_at, "files": files}
        return JSONResponse(answer, status_code=201)

    def put_url(request: Request, key: str, f: DeclaredFile, seconds: int) -> str:
        if config.local_store:
            grant = Grant("PUT", key, int(time.time()) + seconds, f.size, f.content_type)
            return external_url(request, f"/v1/files/{signer.token(grant)}")
        presign = getattr(store, "presigned_put_url", None)
        if presign is None:
            raise ApiError(501, f"the store {store.describe()} cannot presign uploads")
        return presign(key, size=f.size, content_type=f.content_type, expires_in=seconds)

    async def show_upload(request: Request) -> Response:
        """An upload's state and the declared files not uploaded yet.
        ---
        summary: Show an upload
        responses: {200: {description: state, files, missing}, 404: {description: unknown upload}}
        """
        style = style_of(request)
        record, _ = await run_in_threadpool(read_upload_or_404, style, request.path_params["upload_id"])
        missing = await run_in_threadpool(missing_files, store, record) if record.state == "open" else []
        return JSONResponse(upload_json(record) | {"missing": missing})

    def read_upload_or_404(style: str, upload_id: str):
        try:
            return read_upload(store, style, upload_id)
        except UnknownUpload as exc:
            raise ApiError(404, str(exc)) from None

    def upload_json(record) -> dict[str, Any]:
        return {
            "uploadId": record.id,
            "style": record.style,
            "state": record.state,
            "expiresAt": record.expires_at,
            "files": [{"name": f.name, "size": f.size, "contentType": f.content_type} for f in record.files],
            "datasetHash": record.dataset_hash,
            "error": record.error,
            "report": record.report,
        }

    async def complete_upload_route(request: Request) -> Response:
        """Ingest a fully uploaded upload as the style's new dataset version (`dataset add`'s code).
        ---
        summary: Complete an upload
        requestBody: {content: {application/json: {example: {triggerWord: my style, missingCaptions: fill}}}}
        responses:
          200: {description: "the ingest report: accepted, rejected with reasons, datasetHash"}
          404: {description: unknown upload}
          409: {description: files missing or of another size (named), or already completed}
          410: {description: the upload expired or was abandoned}
          422: {description: no file was accepted (the report says why)}
        """
        style = style_of(request)
        upload_id = request.path_params["upload_id"]
        body = await json_body(request, allow_empty=True)
        try:
            options = IngestOptions(
                trigger_word=body.get("triggerWord"),
                missing_captions=body.get("missingCaptions", "fill"),
                min_side=int(body.get("minSide", IngestOptions.min_side)),
            )
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        try:
            record, _ = await run_in_threadpool(complete_upload, store, style, upload_id, options=options)
        except UnknownUpload as exc:
            raise ApiError(404, str(exc)) from None
        except IncompleteUpload as exc:
            raise ApiError(409, str(exc)) from None
        except UploadClosed as exc:
            gone = exc.record.state == "abandoned" or "expired" in str(exc)
            raise ApiError(410 if gone else 409, str(exc), upload=upload_json(exc.record)) from None
        if record.state == "rejected":
            raise ApiError(422, record.error or "no file was accepted", upload=upload_json(record))
        return JSONResponse(upload_json(record))

    routes += [
        route("/v1/styles/{style}/uploads", "POST")(create_upload_route),
        route("/v1/styles/{style}/uploads/{upload_id}", "GET")(show_upload),
        route("/v1/styles/{style}/uploads/{upload_id}/complete", "POST")(complete_upload_route),
    ]

    # -- files the API serves itself (local store) ---------------------------------------------

    async def put_file(request: Request) -> Response:
        """PUT one uploaded file to a URL an upload handed out (local store; no bearer token:
        the URL is signed for this key, size and type).
        ---
        summary: Upload a file (local store)
        responses: {200: {description: stored}, 403: {description: bad, expired or foreign signature}}
        """
        grant = read_grant(request, "PUT")
        if request.headers.get("content-type", "").split(";")[0].strip() != grant.content_type:
            raise ApiError(400, f"Content-Type must be {grant.content_type} (signed into this URL)")
        data = await read_exactly(request, grant.size or 0)
        etag = await run_in_threadpool(store.put, grant.key, data, content_type=grant.content_type)
        return JSONResponse({"stored": grant.key.rsplit("/", 1)[-1], "size": len(data)}, headers={"ETag": etag})

    async def get_file(request: Request) -> Response:
        """Download a file from a URL a download handed out (local store; signed, no bearer token).
        ---
        summary: Download a file (local store)
        responses: {200: {description: the file}, 403: {description: bad or expired signature}}
        """
        grant = read_grant(request, "GET")
        info = await run_in_threadpool(store.head, grant.key)
        if info is None:
            raise ApiError(404, "the file no longer exists")
        name = grant.filename or grant.key.rsplit("/", 1)[-1]
        return StreamingResponse(
            object_chunks(grant.key, info.size),
            media_type="application/octet-stream",
            headers={"Content-Length": str(info.size), "Content-Disposition": f'attachment; filename="{name}"'},
        )

    def object_chunks(key: str, size: int, chunk: int = 4 * 1024 * 1024) -> Iterator[bytes]:
        for start in range(0, size, chunk):
            yield store.get_range(key, start, chunk)

    def read_grant(request: Request, method: str) -> Grant:
        try:
            return signer.read(request.path_params["token"], method)
        except BadToken as exc:
            raise ApiError(403, str(exc)) from None

    routes += [
        route("/v1/files/{token}", "PUT", auth=False)(put_file),
        route("/v1/files/{token}", "GET", auth=False)(get_file),
    ]

    # -- trainings ------------------------------------------------------------------------------

    async def launch_training(request: Request) -> Response:
        """Train the style's current dataset: a train_lora run in Dagster; answers its version.
        ---
        summary: Start a training
        requestBody: {content: {application/json: {example: {baseModel: tiny, params: {max_train_steps: 30}, webhook: "https://app.example/hooks/lora"}}}}
        responses:
          201: {description: "trainingId, runId, version (null while the run waits for a GPU slot)"}
          409: {description: the style has no dataset yet}
          422: {description: a bad parameter or webhook URL (named)}
          502: {description: Dagster refused or is unreachable}
        """
        style = style_of(request)
        body = await json_body(request, allow_empty=True)
        base_model = str(body.get("baseModel", "tiny"))
        params = body.get("params") or {}
        webhook = body.get("webhook")
        if not isinstance(params, dict):
            raise ApiError(422, "params: expected an object of TrainingParams fields")
        try:
            checked = training_params(base_model, params)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(422, f"params.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if webhook is not None:
            check_webhook_url(webhook)
            if not config.webhook_secret:
                raise ApiError(422, "webhook: this server has no LORA_API_WEBHOOK_SECRET to sign callbacks with")
        if await run_in_threadpool(current_dataset, store, style) is None:
            raise ApiError(409, f"style {style!r} has no dataset: upload files and complete the upload first")
        training_id = new_training_id()
        watch = await run_in_threadpool(watch_training, store, training_id, style, webhook) if webhook else None
        run_config = {
            "ops": {
                "submit_lora_training": {
                    "config": {
                        "base_model": base_model,
                        "params": {k: v for k, v in checked.model_dump(mode="json").items() if k in params},
                        "force": bool(body.get("force", False)),
                    }
                }
            }
        }
        run_id = await run_in_threadpool(dagster.launch_training, style, run_config, {API_TRAINING_TAG: training_id})
        if watch is not None:
            watch = replace(watch, run_id=run_id)
            await run_in_threadpool(save_watch, store, watch)
        facts = await run_in_threadpool(wait_for_version, run_id)
        answer = training_json(style, run_id, facts) | {"trainingId": training_id, "webhook": webhook}
        headers = {"Location": f"/v1/styles/{style}/trainings/{run_id}"}
        return JSONResponse(answer, status_code=201, headers=headers)

    def wait_for_version(run_id: str):
        deadline = time.monotonic() + config.version_wait_s
        while True:
            facts = dagster.run_facts(run_id)
            if facts is None or facts.version or facts.status in ("FAILURE", "CANCELED", "SUCCESS"):
                return facts
            if time.monotonic() >= deadline:
                return facts
            time.sleep(0.5)

    def training_json(style: str, run_id: str, facts) -> dict[str, Any]:
        return {
            "style": style,
            "runId": run_id,
            "runStatus": facts.status if facts else None,
            "version": facts.version if facts else None,
            "dagsterRunUrl": f"{dagster.url}/runs/{run_id}",
        }

    async def show_training(request: Request) -> Response:
        """A training run's status and the version it trains (once its step has claimed one).
        ---
        summary: Show a training run
        responses: {200: {description: "runStatus, version, versionStatus"}, 404: {description: no such run}}
        """
        style = style_of(request)
        run_id = request.path_params["run_id"]
        facts = await run_in_threadpool(dagster.run_facts, run_id)
        if facts is None:
            raise ApiError(404, f"Dagster has no run {run_id!r}")
        answer = training_json(style, run_id, facts)
        if facts.version:
            document = await run_in_threadpool(read_document, style)
            version = document.version(facts.version)
            answer["versionStatus"] = version.status.value if version else None
        return JSONResponse(answer)

    async def cancel_training(request: Request) -> Response:
        """Cancel a version's training: its Dagster run is terminated, which cancels the job.
        ---
        summary: Cancel a training
        responses: {200: {description: the runs terminated}, 409: {description: no active run trains it}}
        """
        style = style_of(request)
        document = await run_in_threadpool(read_document, style)
        version = resolve_version_ref(document, request.path_params["version"])
        runs = await run_in_threadpool(dagster.active_runs, style, version.name)
        if not runs:
            raise ApiError(
                409,
                f"{style} {version.name} is {version.status.value} and no active Dagster run trains it; "
                "nothing to cancel",
            )
        for run_id in runs:
            await run_in_threadpool(dagster.terminate, run_id)
        return JSONResponse({"style": style, "version": version.name, "terminatedRuns": runs})

    routes += [
        route("/v1/styles/{style}/trainings", "POST")(launch_training),
        route("/v1/styles/{style}/trainings/{run_id}", "GET")(show_training),
        route("/v1/styles/{style}/trainings/{version}/cancel", "POST")(cancel_training),
    ]

    # -- versions and downloads -------------------------------------------------------------------

    def read_document(style: str) -> RegistryDocument:
        try:
            document, etag = registry.read(style)
        except InvalidRecord as exc:
            raise ApiError(500, f"the registry document of {style} is unreadable: {exc}") from None
        if etag is None:
            raise ApiError(404, f"style {style!r} has no versions yet")
        return document

    async def list_versions(request: Request) -> Response:
        """Every version of a style: status, progress, files, samples; and its aliases.
        ---
        summary: List versions
        responses: {200: {description: "style, aliases, versions"}, 404: {description: no versions}}
        """
        style = style_of(request)
        document = await run_in_threadpool(read_document, style)
        versions = [v.to_dict(config.primary) for v in document.versions]
        return JSONResponse({"style": style, "aliases": document.aliases, "versions": versions})

    async def show_version(request: Request) -> Response:
        """One version, by name (V3) or alias (@production).
        ---
        summary: Show a version
        responses: {200: {description: "the version record, with aliases"}, 404: {description: unknown version or alias}}
        """
        style = style_of(request)
        document = await run_in_threadpool(read_document, style)
        version = resolve_version_ref(document, request.path_params["ref"])
        answer = version.to_dict(config.primary) | {"aliases": document.aliases_of(version)}
        return JSONResponse(answer)

    async def download_version(request: Request) -> Response:
        """A temporary download URL of a version's LoRA file in a layout (kohya or diffusers).
        ---
        summary: Download URL of a version's file
        parameters:
          - {name: format, in: query, schema: {type: string, enum: [kohya, diffusers]}}
          - {name: expiresIn, in: query, schema: {type: integer, maximum: 604800}}
        responses: {200: {description: "url, expiresAt, key, layout, size, tensorsSha256"}, 404: {description: no such file}}
        """
        style = style_of(request)
        layout = request.query_params.get("format", config.primary)
        if layout not in LAYOUTS:
            raise ApiError(400, f"format: {layout!r} is not one of {', '.join(LAYOUTS)}")
        expires = query_int(request, "expiresIn", DEFAULT_URL_EXPIRY_S, 1, 7 * 24 * 3600)
        document = await run_in_threadpool(read_document, style)
        version = resolve_version_ref(document, request.path_params["ref"])
        if version.status is not VersionStatus.completed:
            raise ApiError(409, f"{style} {version.name} is {version.status.value}: it has no LoRA file")
        files = version.files()
        chosen = files.get(layout)
        if chosen is None:
            raise ApiError(
                404, f"{style} {version.name} has no {layout} file (it has: {', '.join(sorted(files)) or 'none'})"
            )
        if config.local_store:
            grant = Grant("GET", chosen.key, int(time.time()) + expires)
            url = external_url(request, f"/v1/files/{signer.token(grant)}")
        else:
            url = await run_in_threadpool(store.presigned_url, chosen.key, expires)
        return JSONResponse(
            {
                "style": style,
                "version": version.name,
                "layout": layout,
                "key": chosen.key,
                "size": chosen.size,
                "tensorsSha256": chosen.checksum,
                "url": url,
                "expiresAt": (datetime.now(UTC) + timedelta(seconds=expires)).isoformat(),
            }
        )

    async def download_dataset(request: Request) -> Response:
        """A dataset version (or ``current``) as one zip: images, caption .txt files, manifest.json; streamed.
        ---
        summary: Download a dataset as a zip
        responses: {200: {description: application/zip}, 404: {description: no such dataset}}
        """
        style = style_of(request)
        wanted = request.path_params["dataset"]
        try:
            chunks = await run_in_threadpool(dataset_zip_chunks, store, style, None if wanted == "current" else wanted)
        except (LookupError, ValueError) as exc:
            raise ApiError(404, str(exc)) from None
        name = f"{style}-{wanted}.zip"
        return StreamingResponse(
            chunks, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    routes += [
        route("/v1/styles/{style}/versions", "GET")(list_versions),
        route("/v1/styles/{style}/versions/{ref}", "GET")(show_version),
        route("/v1/styles/{style}/versions/{ref}/download", "GET")(download_version),
        route("/v1/styles/{style}/datasets/{dataset}.zip", "GET")(download_dataset),
    ]

    # -- admin: the registry operations the CLI and the jobs run ------------------------------------

    def actor(request: Request, body: dict[str, Any]) -> str:
        by = body.get("by")
        return f"api: {by}" if isinstance(by, str) and by.strip() else "api"

    async def move(request: Request, action: AliasAction) -> Response:
        style = style_of(request)
        try:
            alias = validate_alias(request.path_params["alias"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        body = await json_body(request, allow_empty=True)
        version = body.get("version")
        if action == "promote" and not isinstance(version, str):
            raise ApiError(400, "version: the version to promote, e.g. V3")
        try:
            result = await run_in_threadpool(
                lambda: registry.move_alias(
                    style, alias, action=action, version=version, by=actor(request, body), reason=body.get("reason")
                )
            )
        except Refused as exc:
            raise ApiError(409, str(exc)) from None
        return JSONResponse(
            {
                "style": style,
                "alias": result.alias,
                "version": result.version,
                "previous": result.previous,
                "moved": result.moved,
            }
        )

    async def promote(request: Request) -> Response:
        """Point an alias at a completed version (admin token).
        ---
        summary: Promote
        requestBody: {content: {application/json: {example: {version: V3, reason: approved}}}}
        responses: {200: {description: "alias, version, previous, moved"}, 403: {description: not the admin token}, 409: {description: refused (named)}}
        """
        return await move(request, "promote")

    async def rollback(request: Request) -> Response:
        """Point an alias back at its previous version (admin token).
        ---
        summary: Roll back
        responses: {200: {description: "alias, version, previous"}, 403: {description: not the admin token}, 409: {description: refused}}
        """
        return await move(request, "rollback")

    async def delete_version(request: Request) -> Response:
        """Delete a version's files, leaving a tombstone (admin token; refused for an aliased version).
        ---
        summary: Delete a version
        responses: {200: {description: the objects removed}, 403: {description: not the admin token}, 409: {description: refused}}
        """
        style = style_of(request)
        body = await json_body(request, allow_empty=True)
        try:
            result = await run_in_threadpool(
                lambda: registry.delete_version(
                    style, request.path_params["ref"], by=actor(request, body), reason=body.get("reason")
                )
            )
        except (Refused, ValueError) as exc:
            raise ApiError(409, str(exc)) from None
        return JSONResponse(
            {
                "style": style,
                "version": result.version,
                "removed": result.removed,
                "alreadyDeleted": result.already_deleted,
            }
        )

    routes += [
        route("/v1/styles/{style}/aliases/{alias}/promote", "POST", needs_admin=True)(promote),
        route("/v1/styles/{style}/aliases/{alias}/rollback", "POST", needs_admin=True)(rollback),
        route("/v1/styles/{style}/versions/{ref}", "DELETE", needs_admin=True)(delete_version),
    ]

    # -- service ----------------------------------------------------------------------------------

    schemas = SchemaGenerator({"openapi": "3.0.3", "info": {"title": "lora_pipeline API", "version": "1"}})

    async def openapi(request: Request) -> Response:
        """The OpenAPI document of this API.
        ---
        summary: OpenAPI document
        responses: {200: {description: this document}}
        """
        document = schemas.get_schema(routes=app.routes)
        document["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        document["security"] = [{"bearer": []}]
        return JSONResponse(document)

    async def healthz(request: Request) -> Response:
        """Liveness (no token).
        ---
        summary: Health
        responses: {200: {description: ok}}
        """
        return JSONResponse({"status": "ok", "store": store.describe(), "dagster": dagster.url})

    routes += [route("/openapi.json", "GET")(openapi), route("/healthz", "GET", auth=False)(healthz)]

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

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return app


def callback_pump(store: ObjectStore, dagster: DagsterClient, config: ApiConfig) -> CallbackPump:
    """The pump the API server runs: Dagster for run facts, httpx for the POSTs."""
    assert config.webhook_secret
    client = httpx.Client(timeout=10.0, follow_redirects=False)

    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        return client.post(url, content=body, headers=headers).status_code

    return CallbackPump(store, config.webhook_secret, run_facts=dagster.run_facts, post=post, primary=config.primary)


def _pump_loop(pump: CallbackPump, stop: threading.Event, interval: float) -> None:
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
