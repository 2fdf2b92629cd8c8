"""Version routes: versions by name or @alias, download URLs, the dataset zip, and the admin
operations (promote, rollback, delete: the registry's own, as the CLI and the jobs run them)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lora_pipeline.api.datasets import dataset_zip_chunks
from lora_pipeline.api.http import Api, ApiError, RouteSpec, json_body, query_int, style_of
from lora_pipeline.api.signed_urls import Grant
from lora_pipeline.registry.aliases import AliasAction, validate_alias
from lora_pipeline.registry.models import InvalidRecord, RegistryDocument, VersionStatus
from lora_pipeline.registry.version_refs import resolve_version_ref
from lora_pipeline.registry_store.documents import Refused

DEFAULT_URL_EXPIRY_S = 3600
LAYOUTS = ("kohya", "diffusers")


def read_document(api: Api, style: str) -> RegistryDocument:
    try:
        document, etag = api.registry.read(style)
    except InvalidRecord as exc:
        raise ApiError(500, f"the registry document of {style} is unreadable: {exc}") from None
    if etag is None:
        raise ApiError(404, f"style {style!r} has no versions yet")
    return document


async def list_versions(api: Api, request: Request) -> Response:
    """Every version of a style: status, family and base model (`family`, `baseModel`), progress, files,
    samples; and its aliases.
    ---
    summary: List versions
    responses: {200: {description: "style, aliases, versions"}, 404: {description: no versions}}
    """
    style = style_of(request)
    document = await run_in_threadpool(read_document, api, style)
    versions = [v.to_dict(api.config.primary) for v in document.versions]
    return JSONResponse({"style": style, "aliases": document.aliases, "versions": versions})


async def show_version(api: Api, request: Request) -> Response:
    """One version, by name (V3) or alias (@production).
    ---
    summary: Show a version
    responses: {200: {description: "the version record, with aliases"}, 404: {description: unknown version or alias}}
    """
    style = style_of(request)
    document = await run_in_threadpool(read_document, api, style)
    version = resolve_version_ref(document, request.path_params["ref"])
    answer = version.to_dict(api.config.primary) | {"aliases": document.aliases_of(version)}
    return JSONResponse(answer)


async def download_version(api: Api, request: Request) -> Response:
    """A temporary download URL of a version's LoRA file in a layout (kohya or diffusers).
    ---
    summary: Download URL of a version's file
    parameters:
      - {name: format, in: query, schema: {type: string, enum: [kohya, diffusers]}}
      - {name: expiresIn, in: query, schema: {type: integer, maximum: 604800}}
    responses: {200: {description: "url, expiresAt, key, layout, size, tensorsSha256"}, 404: {description: no such file}}
    """
    style = style_of(request)
    layout = request.query_params.get("format", api.config.primary)
    if layout not in LAYOUTS:
        raise ApiError(400, f"format: {layout!r} is not one of {', '.join(LAYOUTS)}")
    expires = query_int(request, "expiresIn", DEFAULT_URL_EXPIRY_S, 1, 7 * 24 * 3600)
    document = await run_in_threadpool(read_document, api, style)
    version = resolve_version_ref(document, request.path_params["ref"])
    if version.status is not VersionStatus.completed:
        raise ApiError(409, f"{style} {version.name} is {version.status.value}: it has no LoRA file")
    files = version.files()
    chosen = files.get(layout)
    if chosen is None:
        raise ApiError(
            404, f"{style} {version.name} has no {layout} file (it has: {', '.join(sorted(files)) or 'none'})"
        )
    if api.config.local_store:
        grant = Grant("GET", chosen.key, int(time.time()) + expires)
        url = api.external_url(request, f"/v1/files/{api.signer.token(grant)}")
    else:
        url = await run_in_threadpool(api.store.presigned_url, chosen.key, expires)
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


async def download_dataset(api: Api, request: Request) -> Response:
    """A dataset version (or ``current``) as one zip: images, caption .txt files, manifest.json; streamed.
    ---
    summary: Download a dataset as a zip
    responses: {200: {description: application/zip}, 404: {description: no such dataset}}
    """
    style = style_of(request)
    wanted = request.path_params["dataset"]
    try:
        chunks = await run_in_threadpool(dataset_zip_chunks, api.store, style, None if wanted == "current" else wanted)
    except (LookupError, ValueError) as exc:
        raise ApiError(404, str(exc)) from None
    name = f"{style}-{wanted}.zip"
    return StreamingResponse(
        chunks, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


def actor(request: Request, body: dict[str, Any]) -> str:
    by = body.get("by")
    return f"api: {by}" if isinstance(by, str) and by.strip() else "api"


async def move(api: Api, request: Request, action: AliasAction) -> Response:
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
            lambda: api.registry.move_alias(
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


async def promote(api: Api, request: Request) -> Response:
    """Point an alias at a completed version (admin token).
    ---
    summary: Promote
    requestBody: {content: {application/json: {example: {version: V3, reason: approved}}}}
    responses: {200: {description: "alias, version, previous, moved"}, 403: {description: not the admin token}, 409: {description: refused (named)}}
    """
    return await move(api, request, "promote")


async def rollback(api: Api, request: Request) -> Response:
    """Point an alias back at its previous version (admin token).
    ---
    summary: Roll back
    responses: {200: {description: "alias, version, previous"}, 403: {description: not the admin token}, 409: {description: refused}}
    """
    return await move(api, request, "rollback")


async def delete_version(api: Api, request: Request) -> Response:
    """Delete a version's files, leaving a tombstone (admin token; refused for an aliased version).
    ---
    summary: Delete a version
    responses: {200: {description: the objects removed}, 403: {description: not the admin token}, 409: {description: refused}}
    """
    style = style_of(request)
    body = await json_body(request, allow_empty=True)
    try:
        result = await run_in_threadpool(
            lambda: api.registry.delete_version(
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


ROUTES = [
    RouteSpec("/v1/styles/{style}/versions", "GET", list_versions),
    RouteSpec("/v1/styles/{style}/versions/{ref}", "GET", show_version),
    RouteSpec("/v1/styles/{style}/versions/{ref}/download", "GET", download_version),
    RouteSpec("/v1/styles/{style}/datasets/{dataset}.zip", "GET", download_dataset),
    RouteSpec("/v1/styles/{style}/aliases/{alias}/promote", "POST", promote, admin=True),
    RouteSpec("/v1/styles/{style}/aliases/{alias}/rollback", "POST", rollback, admin=True),
    RouteSpec("/v1/styles/{style}/versions/{ref}", "DELETE", delete_version, admin=True),
]
