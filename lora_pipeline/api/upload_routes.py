"""Upload routes: declare files, PUT them (presigned S3, or the API's own signed URLs on the
local store), complete → the style's new dataset version (lifecycle/uploads.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lora_pipeline.api.http import Api, ApiError, RouteSpec, json_body, read_exactly, style_of
from lora_pipeline.api.signed_urls import BadToken, Grant
from lora_pipeline.dataset.ingest import IngestOptions
from lora_pipeline.lifecycle.uploads import (
    DeclaredFile,
    IncompleteUpload,
    UnknownUpload,
    UploadClosed,
    UploadRecord,
    UploadRefused,
    complete_upload,
    create_upload,
    missing_files,
    read_upload,
)


async def create_upload_route(api: Api, request: Request) -> Response:
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
        record = await run_in_threadpool(create_upload, api.store, style, declared, ttl=api.config.upload_ttl)
    except UploadRefused as exc:
        raise ApiError(413 if "bytes" in str(exc) else 400, str(exc)) from None
    expires = datetime.fromisoformat(record.expires_at)
    seconds = max(1, int((expires - datetime.now(UTC)).total_seconds()))
    files = []
    for f in record.files:
        headers = {"Content-Type": f.content_type, "Content-Length": str(f.size)}
        url = await run_in_threadpool(put_url, api, request, record.key(f.name), f, seconds)
        files.append({"name": f.name, "method": "PUT", "url": url, "headers": headers})
    answer = {"uploadId": record.id, "style": style, "expiresAt": record.expires_at, "files": files}
    return JSONResponse(answer, status_code=201)


def put_url(api: Api, request: Request, key: str, f: DeclaredFile, seconds: int) -> str:
    if api.config.local_store:
        grant = Grant("PUT", key, int(time.time()) + seconds, f.size, f.content_type)
        return api.external_url(request, f"/v1/files/{api.signer.token(grant)}")
    presign = getattr(api.store, "presigned_put_url", None)
    if presign is None:
        raise ApiError(501, f"the store {api.store.describe()} cannot presign uploads")
    return presign(key, size=f.size, content_type=f.content_type, expires_in=seconds)


async def show_upload(api: Api, request: Request) -> Response:
    """An upload's state and the declared files not uploaded yet.
    ---
    summary: Show an upload
    responses: {200: {description: state, files, missing}, 404: {description: unknown upload}}
    """
    style = style_of(request)
    record, _ = await run_in_threadpool(read_upload_or_404, api, style, request.path_params["upload_id"])
    missing = await run_in_threadpool(missing_files, api.store, record) if record.state == "open" else []
    return JSONResponse(upload_json(record) | {"missing": missing})


def read_upload_or_404(api: Api, style: str, upload_id: str) -> tuple[UploadRecord, str]:
    try:
        return read_upload(api.store, style, upload_id)
    except UnknownUpload as exc:
        raise ApiError(404, str(exc)) from None


def upload_json(record: UploadRecord) -> dict[str, Any]:
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


async def complete_upload_route(api: Api, request: Request) -> Response:
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
        record, _ = await run_in_threadpool(complete_upload, api.store, style, upload_id, options=options)
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


async def put_file(api: Api, request: Request) -> Response:
    """PUT one uploaded file to a URL an upload handed out (local store; no bearer token:
    the URL is signed for this key, size and type).
    ---
    summary: Upload a file (local api.store)
    responses: {200: {description: stored}, 403: {description: bad, expired or foreign signature}}
    """
    grant = read_grant(api, request, "PUT")
    if request.headers.get("content-type", "").split(";")[0].strip() != grant.content_type:
        raise ApiError(400, f"Content-Type must be {grant.content_type} (signed into this URL)")
    data = await read_exactly(request, grant.size or 0)
    etag = await run_in_threadpool(api.store.put, grant.key, data, content_type=grant.content_type)
    return JSONResponse({"stored": grant.key.rsplit("/", 1)[-1], "size": len(data)}, headers={"ETag": etag})


async def get_file(api: Api, request: Request) -> Response:
    """Download a file from a URL a download handed out (local store; signed, no bearer token).
    ---
    summary: Download a file (local api.store)
    responses: {200: {description: the file}, 403: {description: bad or expired signature}}
    """
    grant = read_grant(api, request, "GET")
    info = await run_in_threadpool(api.store.head, grant.key)
    if info is None:
        raise ApiError(404, "the file no longer exists")
    name = grant.filename or grant.key.rsplit("/", 1)[-1]
    return StreamingResponse(
        object_chunks(api, grant.key, info.size),
        media_type="application/octet-stream",
        headers={"Content-Length": str(info.size), "Content-Disposition": f'attachment; filename="{name}"'},
    )


def object_chunks(api: Api, key: str, size: int, chunk: int = 4 * 1024 * 1024) -> Iterator[bytes]:
    for start in range(0, size, chunk):
        yield api.store.get_range(key, start, chunk)


def read_grant(api: Api, request: Request, method: str) -> Grant:
    try:
        return api.signer.read(request.path_params["token"], method)
    except BadToken as exc:
        raise ApiError(403, str(exc)) from None


ROUTES = [
    RouteSpec("/v1/styles/{style}/uploads", "POST", create_upload_route),
    RouteSpec("/v1/styles/{style}/uploads/{upload_id}", "GET", show_upload),
    RouteSpec("/v1/styles/{style}/uploads/{upload_id}/complete", "POST", complete_upload_route),
    RouteSpec("/v1/files/{token}", "PUT", put_file, auth=False),
    RouteSpec("/v1/files/{token}", "GET", get_file, auth=False),
]
