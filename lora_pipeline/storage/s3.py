"""The S3 backend: any S3-speaking endpoint (AWS, RunPod's S3 API, MinIO, moto).

The legacy backend used a bare boto3 client: no retries, no timeouts, and a
conditional write nowhere, so two workers updating one status document silently
overwrote each other. Here:

* the client is built once with botocore's retry mode, attempts and connect/read
  timeouts (``S3Options``; the Dagster layer may pass its own client instead);
* every botocore error becomes one of base.py's exceptions, so nothing above
  this module imports botocore;
* ``put(if_match=…)`` / ``put(if_none_match=True)`` map to S3's conditional
  PutObject; a 412 (or AWS's 409 ConditionalRequestConflict) is PreconditionFailed;
* ``check()`` verifies at start that the bucket exists, the credentials work and
  the endpoint really honours conditional writes, and says so when it does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Unpack
from urllib.parse import quote, urlsplit

from lora_pipeline.settings import Settings, get_settings
from lora_pipeline.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StoredObject,
    validate_stored_key,
)
from lora_pipeline.storage.local import RESERVED_DIR, validate_prefix

if TYPE_CHECKING:  # stubs only (types-boto3[s3]); boto3 itself is imported where it is used
    from boto3.s3.transfer import TransferConfig
    from boto3.session import Session
    from botocore.config import Config
    from types_boto3_s3.client import S3Client
    from types_boto3_s3.type_defs import (
        GetObjectOutputTypeDef,
        ListObjectsV2OutputTypeDef,
        ListObjectsV2RequestPaginateTypeDef,
    )

log = logging.getLogger(__name__)

T = TypeVar("T")
AddressingStyle = Literal["auto", "path", "virtual"]
RetryMode = Literal["standard", "adaptive", "legacy"]

MB = 1024 * 1024

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_AUTH = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "Forbidden",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}
_CREDENTIALS_HINT = "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"


class _WriteCondition(TypedDict, total=False):
    """The conditional-write headers of a PutObject (the probe sends one at a time)."""

    IfMatch: str
    IfNoneMatch: str


class ConditionalWritesUnsupported(UserWarning):
    """The endpoint ignores If-Match / If-None-Match: writers must be serialized elsewhere."""


@dataclass(frozen=True)
class S3Options:
    """How the boto3 client talks to the endpoint; each field has a setting (``from_settings``).

    Defaults suit AWS and RunPod's S3 API alike: ``standard`` retries (exponential
    backoff with jitter, retries 5xx/throttling/connection errors) for 5 attempts,
    a 5 s connect timeout so a dead endpoint fails fast, and a 60 s read timeout
    so a stalled response does not hang a Dagster step forever.
    """

    endpoint_url: str | None = None  # AWS_ENDPOINT_URL_S3 (then AWS_ENDPOINT_URL)
    region: str | None = None  # AWS_REGION (then AWS_DEFAULT_REGION)
    addressing_style: AddressingStyle = "auto"  # LORA_S3_ADDRESSING_STYLE: auto | path | virtual
    retry_mode: RetryMode = "standard"  # AWS_RETRY_MODE: standard | adaptive | legacy
    max_attempts: int = 5  # AWS_MAX_ATTEMPTS (first try included)
    connect_timeout: float = 5.0  # LORA_S3_CONNECT_TIMEOUT, seconds
    read_timeout: float = 60.0  # LORA_S3_READ_TIMEOUT, seconds
    max_pool_connections: int = 64  # LORA_S3_MAX_POOL_CONNECTIONS
    accelerate: bool = False  # LORA_S3_ACCELERATE: record s3-accelerate URLs
    multipart_threshold: int = 16 * MB  # LORA_S3_MULTIPART_THRESHOLD_MB
    multipart_chunksize: int = 16 * MB  # LORA_S3_MULTIPART_CHUNKSIZE_MB
    transfer_concurrency: int = 16  # LORA_TRANSFER_CONCURRENCY (files and parts in flight)
    # Sensor ticks and schedule evaluations use these instead (capped by the above):
    # Dagster cuts a tick at 60 s, and a tick must skip well before that (for_ticks).
    tick_connect_timeout: float = 2.0  # LORA_S3_TICK_CONNECT_TIMEOUT, seconds
    tick_read_timeout: float = 5.0  # LORA_S3_TICK_READ_TIMEOUT, seconds
    tick_max_attempts: int = 2  # LORA_S3_TICK_MAX_ATTEMPTS (first try included)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> S3Options:
        """The options of ``settings`` (default ``get_settings()``, where each value was checked),
        each overridden by a non-None keyword (e.g. a Dagster resource's field)."""
        s = settings or get_settings()
        values: dict[str, Any] = dict(
            endpoint_url=s.s3_endpoint_url,
            region=s.aws_region,
            addressing_style=s.s3_addressing_style,
            retry_mode=s.aws_retry_mode,
            max_attempts=s.aws_max_attempts,
            connect_timeout=s.s3_connect_timeout,
            read_timeout=s.s3_read_timeout,
            max_pool_connections=s.s3_max_pool_connections,
            accelerate=s.s3_accelerate,
            multipart_threshold=s.s3_multipart_threshold_mb * MB,
            multipart_chunksize=s.s3_multipart_chunksize_mb * MB,
            transfer_concurrency=s.transfer_concurrency,
            tick_connect_timeout=s.s3_tick_connect_timeout,
            tick_read_timeout=s.s3_tick_read_timeout,
            tick_max_attempts=s.s3_tick_max_attempts,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        """Check values given directly or as overrides (the settings' own are checked already)."""
        if self.addressing_style not in {"auto", "path", "virtual"}:
            raise StorageError(f"LORA_S3_ADDRESSING_STYLE must be auto, path or virtual, got {self.addressing_style!r}")
        if self.retry_mode not in {"standard", "adaptive", "legacy"}:
            raise StorageError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, got {self.retry_mode!r}")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise StorageError(f"AWS_ENDPOINT_URL_S3 must be an http(s) URL, got {self.endpoint_url!r}")

    def for_ticks(self) -> S3Options:
        """The options a sensor tick or schedule evaluation talks to S3 with.

        Connect and read timeouts and attempts are capped by the ``tick_*`` fields
        and the retry mode is ``standard`` (``adaptive`` may also wait client-side),
        so a request to a stalled or refusing endpoint fails within
        ``failure_bound_s()`` (16 s with the defaults), and a tick, which stops at
        its first failed request, skips well inside Dagster's 60 s.
        """
        return replace(
            self,
            retry_mode="standard",
            connect_timeout=min(self.connect_timeout, self.tick_connect_timeout),
            read_timeout=min(self.read_timeout, self.tick_read_timeout),
            max_attempts=min(self.max_attempts, self.tick_max_attempts),
        )

    def failure_bound_s(self) -> float:
        """The longest one request can take to fail when the endpoint stalls or refuses.

        Every attempt waits at most the connect timeout (connection not accepted)
        or the read timeout (accepted, no answer); botocore's ``standard`` mode
        sleeps ``rand(0, 1) * min(2**(i-1), 20)`` s at most before retry ``i``
        (1 s scale for throttling, 50 ms otherwise), plus up to 5 s more when the
        endpoint sends ``x-amz-retry-after``. Not covered: DNS resolution, and an
        endpoint that trickles its answer a byte per read timeout.
        """
        backoff = sum(min(2.0 ** (i - 1), 20.0) + 5.0 for i in range(1, self.max_attempts))
        return self.max_attempts * max(self.connect_timeout, self.read_timeout) + backoff

    def botocore_config(self) -> Config:
        """The botocore Config these options stand for (also usable with dagster-aws)."""
        from botocore.config import Config

        return Config(
            region_name=self.region,
            retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_pool_connections,
            s3={"addressing_style": self.addressing_style},
            signature_version="s3v4",
            # Only send/verify checksums where the operation needs them, so
            # non-AWS endpoints (RunPod, older MinIO) accept our PutObject calls.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    def transfer_config(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.transfer_concurrency,
            use_threads=True,
        )


def build_s3_client(
    options: S3Options | None = None, *, session: Session | None = None, **client_kwargs: Any
) -> S3Client:
    """A boto3 S3 client with the options' retries, timeouts and addressing style.

    ``session``: a boto3 Session to build from (reusing one saves reloading the
    service model, ~0.2 s per client); by default a fresh one.
    """
    import boto3

    options = options or S3Options.from_settings()
    session = session or boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region,
        config=options.botocore_config(),
        **client_kwargs,
    )


def _error_code(exc: BaseException) -> tuple[str, int | None, str]:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), status, str(error.get("Message", "")) or str(exc)


class S3Store:
    """An ObjectStore on an S3 bucket and prefix."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        public_base_url: str | None = None,
        accelerate: bool = False,
        options: S3Options | None = None,
        supports_conditional_writes: bool = True,
    ) -> None:
        if not bucket:
            raise StorageError("S3 bucket name is empty (LORA_STORAGE_URL=s3://<bucket>/<prefix>)")
        self.client = client
        self.bucket = bucket
        prefix = prefix.strip("/")
        if prefix:
            validate_prefix(prefix + "/")
        self.prefix = prefix + "/" if prefix else ""
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.accelerate = accelerate
        self.options = options or S3Options()
        self.supports_conditional_writes = supports_conditional_writes

    # -- helpers -----------------------------------------------------------------

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def __repr__(self) -> str:
        return f"S3Store({self.describe()!r})"

    def _full(self, key: str) -> str:
        validate_stored_key(key)
        if key.split("/", 1)[0] == RESERVED_DIR:
            raise InvalidKey(f"invalid object key {key!r}: {RESERVED_DIR}/ is reserved")
        return self.prefix + key

    def _error(self, exc: Exception, op: str, key: str | None = None) -> StorageError:
        """Translate a botocore exception into the store's exception types."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code, status, message = _error_code(exc)
            if key is not None and (code in _NOT_FOUND or status == 404) and code != "NoSuchBucket":
                return ObjectNotFound(key)
            if code in _PRECONDITION or (status in (409, 412) and op in ("put", "upload")):
                return PreconditionFailed(key or "", message)
            if code == "NoSuchBucket":
                return StorageError(
                    f"S3 bucket {self.bucket!r} does not exist at "
                    f"{self.client.meta.endpoint_url} (check LORA_STORAGE_URL)"
                )
            if code in _AUTH or status == 403:
                return StorageError(f"S3 refused {op} on {self.describe()}: {code} {message}; {_CREDENTIALS_HINT}")
            return StorageError(f"S3 {op} {key or ''} failed: {code or status} {message}".rstrip())
        return StorageError(f"S3 {op} {key or ''} failed: {type(exc).__name__}: {exc}")

    def _call(self, op: str, key: str | None, fn: Callable[..., T], **kwargs: Any) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, op, key) from exc

    def transfer_config(self) -> TransferConfig:
        return self.options.transfer_config()

    def etag_for_file(self, path: Path) -> str:
        """The ETag S3 gives ``path``'s content when uploaded by ``upload_file``.

        Single-part: md5 hex. Multipart: md5 of the parts' md5s, then ``-<parts>``.
        Used to skip files already in the store without downloading them.
        """
        import hashlib

        size = Path(path).stat().st_size
        chunk = self.options.multipart_chunksize
        if size < self.options.multipart_threshold:
            from lora_pipeline.storage.local import md5_file

            return md5_file(Path(path))
        digests = []
        with open(path, "rb") as handle:
            while part := handle.read(chunk):
                digests.append(hashlib.md5(part, usedforsecurity=False).digest())
        combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(digests)}"

    # -- start-up checks -----------------------------------------------------------

    def check(self, *, probe_conditional_writes: bool = True) -> S3Store:
        """Fail at start, with one clear error, if the bucket or credentials are wrong.

        Then probe whether the endpoint honours conditional writes: some
        S3-compatible services accept ``If-None-Match`` and ignore it. If so,
        ``supports_conditional_writes`` becomes False and a warning says that
        registry writers refuse to run there unless LORA_WRITER_LOCK_DIR serializes
        them (storage/writer_lock.py): never a silent last-writer-wins.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code, status, message = _error_code(exc)
            if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
                raise StorageError(
                    f"S3 bucket {self.bucket!r} does not exist at "
                    f"{self.client.meta.endpoint_url or 'AWS'} (check LORA_STORAGE_URL "
                    "and AWS_ENDPOINT_URL_S3)"
                ) from None
            if code in _AUTH or status in (401, 403):
                raise StorageError(
                    f"S3 refused access to bucket {self.bucket!r} ({code or status}); {_CREDENTIALS_HINT}"
                ) from None
            raise StorageError(f"cannot reach S3 bucket {self.bucket!r}: {code} {message}") from None
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot reach the S3 endpoint {self.client.meta.endpoint_url} for bucket "
                f"{self.bucket!r} (check AWS_ENDPOINT_URL_S3): {exc}"
            ) from None
        if probe_conditional_writes:
            self.supports_conditional_writes = self._probe_conditional_writes()
        return self

    def _probe_conditional_writes(self) -> bool:
        """Write a probe object three times: plain create, then two writes that must be refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        probe = f"{self.prefix}{RESERVED_DIR}/probe-{uuid.uuid4().hex}"
        stale_etag = '"00000000000000000000000000000000"'

        def refused(**condition: Unpack[_WriteCondition]) -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"x", **condition)
            except ClientError as exc:
                code, status, _ = _error_code(exc)
                if code in _PRECONDITION or status in (409, 412):
                    return True
                raise
            return False

        answering = True  # False: the endpoint is failing, so no clean-up request either
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe", IfNoneMatch="*")
            honoured = refused(IfNoneMatch="*") and refused(IfMatch=stale_etag)
        except ClientError as exc:
            code, status, message = _error_code(exc)
            if code in _AUTH or status == 403:
                raise StorageError(
                    f"S3 refused a test write to {self.describe()} ({code}); the pipeline needs "
                    f"write access; {_CREDENTIALS_HINT}"
                ) from None
            if status is not None and status >= 500 and status != 501:
                # Still failing after the retries: the endpoint is unwell, not saying "unsupported".
                answering = False
                raise StorageError(f"S3 test write to {self.describe()} failed: {code or status} {message}") from None
            # Anything else (e.g. NotImplemented for the header) means: not supported.
            log.debug("conditional write probe failed: %s %s", code, message)
            honoured = False
        except BotoCoreError as exc:  # timeouts, refused or dropped connections
            answering = False
            raise StorageError(
                f"cannot reach the S3 endpoint {self.client.meta.endpoint_url} for a test write to "
                f"{self.describe()} (check AWS_ENDPOINT_URL_S3): {exc}"
            ) from None
        finally:
            # A probe object left behind by an outage sits under the reserved prefix,
            # which listings never show.
            if answering:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=probe)
        if not honoured:
            warnings.warn(
                f"the S3 endpoint {self.client.meta.endpoint_url or 'AWS'} ignores conditional "
                "writes (If-Match / If-None-Match): registry writes refuse to run there unless "
                "LORA_WRITER_LOCK_DIR names a folder all writers share, whose lock serializes them",
                ConditionalWritesUnsupported,
                stacklevel=3,
            )
        return honoured

    # -- ObjectStore -------------------------------------------------------------

    def get(self, key: str) -> StoredObject:
        full = self._full(key)
        response = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=full)
        data = self._read_body(response, key)
        return StoredObject(key=key, data=data, etag=response["ETag"].strip('"'))

    def _read_body(self, response: GetObjectOutputTypeDef, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            with contextlib.closing(response["Body"]) as body:
                return body.read()
        except BotoCoreError as exc:
            raise self._error(exc, "read", key) from exc

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        full = self._full(key)
        if length == 0:
            if self.head(key) is None:
                raise ObjectNotFound(key)
            return b""
        response = self._ranged_get("get", key, full, start, start + length - 1)
        if response is None:  # start is past the end
            return b""
        return self._read_body(response, key)

    def _ranged_get(self, op: str, key: str, full: str, first: int, last: int) -> GetObjectOutputTypeDef | None:
        """GetObject for bytes ``first``–``last``; None when ``first`` is past the end
        (S3 answers 416 InvalidRange, e.g. for any range of an empty object)."""
        try:
            return self._call(
                op, key, self.client.get_object, Bucket=self.bucket, Key=full, Range=f"bytes={first}-{last}"
            )
        except StorageError as exc:
            if exc.__cause__ is not None and _error_code(exc.__cause__)[0] == "InvalidRange":
                return None
            raise

    def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            response = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=response["ETag"].strip('"'),
            last_modified=response["LastModified"],
        )

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        full = self._full(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": bytes(data)}
        if content_type:
            kwargs["ContentType"] = content_type
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if (if_match is not None or if_none_match) and not self.supports_conditional_writes:
            # The endpoint would ignore the headers. Check what we can (not atomic: shared
            # documents are written under the writer lock, storage/writer_lock.py) rather
            # than pretend the condition held.
            current = self.head(key)
            if if_none_match and current is not None:
                raise PreconditionFailed(key, "object already exists")
            if if_match is not None and (current is None or current.etag != if_match.strip('"')):
                raise PreconditionFailed(key, "object changed since it was read")
            kwargs.pop("IfMatch", None)
            kwargs.pop("IfNoneMatch", None)
        try:
            response = self._call("put", key, self.client.put_object, **kwargs)
        except ObjectNotFound:
            # S3 answers If-Match on a missing key with 404; to callers that is a lost race.
            raise PreconditionFailed(key, "object does not exist") from None
        return response["ETag"].strip('"')

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=full)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        reserved = self.prefix + RESERVED_DIR + "/"
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                full = item["Key"]
                if full.startswith(reserved):
                    continue
                yield ObjectInfo(
                    key=full[len(self.prefix) :],
                    size=int(item["Size"]),
                    etag=item["ETag"].strip('"'),
                    last_modified=item["LastModified"],
                )

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        reserved = self.prefix + RESERVED_DIR + "/"
        for page in self._pages(prefix, delimiter="/"):
            for item in page.get("CommonPrefixes", []):
                if item["Prefix"] != reserved:
                    yield item["Prefix"][len(self.prefix) :]

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[ListObjectsV2OutputTypeDef]:
        """ListObjectsV2 pages under ``prefix`` (never the reserved bookkeeping folder)."""
        validate_prefix(prefix)
        if prefix.split("/", 1)[0] == RESERVED_DIR:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        args: ListObjectsV2RequestPaginateTypeDef = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        try:
            yield from paginator.paginate(**args)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", None) from exc

    def upload_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """Upload a file; above the multipart threshold in concurrent parts.

        Small files go up in one PutObject (one request, its ETag in the reply).
        Large ones go through boto3's transfer manager, which aborts the multipart
        upload when a part fails, so no partial object ever becomes visible.
        ``if_none_match`` sends ``If-None-Match: *`` with the PutObject, or with the
        CompleteMultipartUpload of a large file (the transfer manager cannot), so
        the create is atomic: of two uploaders of one key exactly one wins.
        """
        full = self._full(key)
        source = Path(path)
        size = source.stat().st_size
        conditional: dict[str, str] = {}
        if if_none_match:
            if self.supports_conditional_writes:
                conditional["IfNoneMatch"] = "*"
            elif self.head(key) is not None:  # the endpoint ignores the header: check what we can
                raise PreconditionFailed(key, "object already exists")
        if size < self.options.multipart_threshold:
            with open(source, "rb") as body:
                response = self._call(
                    "upload",
                    key,
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=full,
                    Body=body,
                    **conditional,
                )
            return response["ETag"].strip('"')
        if conditional:
            return self._create_multipart(key, source)
        from boto3.exceptions import S3UploadFailedError

        try:
            self._call(
                "upload",
                key,
                self.client.upload_file,
                Filename=str(source),
                Bucket=self.bucket,
                Key=full,
                Config=self.transfer_config(),
            )
        except S3UploadFailedError as exc:
            raise StorageError(f"S3 upload of {key} failed: {exc}") from exc
        info = self.head(key)
        if info is None:
            raise StorageError(f"S3 upload of {key} finished but the object is missing")
        return info.etag

    def _create_multipart(self, key: str, source: Path) -> str:
        """A multipart upload completed with ``If-None-Match: *``; aborted on any failure,
        so a lost race or a failed part leaves no object and no orphaned parts."""
        full = self._full(key)
        upload = self._call("upload", key, self.client.create_multipart_upload, Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        try:
            parts = []
            with open(source, "rb") as handle:
                number = 1
                while chunk := handle.read(self.options.multipart_chunksize):
                    part = self._call(
                        "upload",
                        key,
                        self.client.upload_part,
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
                    number += 1
            response = self._call(
                "upload",
                key,
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise
        return response["ETag"].strip('"')

    def download_file(self, key: str, path: Path) -> None:
        """Download into a temp file beside ``path``, then rename it into place.

        The first request fetches up to the multipart threshold; only objects
        larger than that go through the transfer manager's parallel ranged GETs,
        so a small file costs one request, not a HEAD plus a GET.
        """
        full = self._full(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                if not self._download_small(key, full, handle):
                    handle.close()
                    self._call(
                        "download",
                        key,
                        self.client.download_file,
                        Bucket=self.bucket,
                        Key=full,
                        Filename=tmp,
                        Config=self.transfer_config(),
                    )
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _download_small(self, key: str, full: str, handle: IO[bytes]) -> bool:
        """Write the object to ``handle`` if it fits in one ranged GET; False if larger."""
        from botocore.exceptions import BotoCoreError

        threshold = self.options.multipart_threshold
        response = self._ranged_get("download", key, full, 0, threshold - 1)
        if response is None:
            return True  # an empty object: nothing to write
        content_range = response.get("ContentRange") or ""
        total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else None
        if total is not None and total > threshold:
            response["Body"].close()
            return False
        try:
            for chunk in response["Body"].iter_chunks(MB):
                handle.write(chunk)
        except BotoCoreError as exc:
            raise self._error(exc, "download", key) from exc
        return True

    def url(self, key: str) -> str:
        """The URL to record: public base, else accelerated, else the endpoint's own."""
        full = self._full(key)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key, safe='/')}"
        quoted = quote(full, safe="/")
        if self.accelerate:
            return f"https://{self.bucket}.s3-accelerate.amazonaws.com/{quoted}"
        endpoint = self.client.meta.endpoint_url.rstrip("/")
        parts = urlsplit(endpoint)
        # The client's own setting wins: it may come from dagster-aws, not from our options.
        client_s3 = getattr(getattr(self.client.meta, "config", None), "s3", None) or {}
        style = client_s3.get("addressing_style") or self.options.addressing_style
        virtual_ok = "." not in self.bucket or parts.scheme == "http"
        if style == "virtual" or (
            style == "auto" and parts.hostname and parts.hostname.endswith("amazonaws.com") and virtual_ok
        ):
            return f"{parts.scheme}://{self.bucket}.{parts.netloc}/{quoted}"
        return f"{endpoint}/{self.bucket}/{quoted}"

    def presigned_url(self, key: str, expires_in: int = 3600) -> str:
        """A temporary GET URL (never stored: it expires, and it carries a signature)."""
        if not 0 < expires_in <= 7 * 24 * 3600:
            raise ValueError(f"expires_in must be between 1 s and 7 days, got {expires_in}")
        full = self._full(key)
        return self._call(
            "presign",
            key,
            self.client.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": full},
            ExpiresIn=expires_in,
        )
