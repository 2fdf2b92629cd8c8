"""The object-store layout (DESIGN.md, "Object store layout"), in one place.

Every key the pipeline reads or writes is built here, from validated style names,
so no other module concatenates paths and nothing can escape its prefix.
"""

from __future__ import annotations

import hashlib
import re

from lora_pipeline.registry.names import companion_filename, lora_filename, validate_style

_RUN_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_CHECKPOINT_SEGMENT = re.compile(r"[A-Za-z0-9._=+@-]{1,100}")

DATASETS = "datasets"
LORAS = "loras"
REGISTRY = "registry"
WEBHOOK_INBOX = "webhooks/inbox"
WEBHOOK_PROCESSED = "webhooks/processed"
WEBHOOK_SEEN = "webhooks/seen"  # delivery claims (webhook/inbox.py)
WEBHOOK_REJECTED = "webhooks/rejected"  # unusable bodies, each with a .reason.txt
CHECKPOINTS = "checkpoints"  # training checkpoints, per request (worker/checkpoint.py)
COMPARISONS = "comparisons"  # side-by-side renders of two versions (worker/compare.py)
RUNS = "runs"  # start markers the worker writes: which job runs which request (healing unknown ids)
INDEX_KEY = f"{REGISTRY}/index.json"
INCOMING = "incoming"  # drops: incoming/<style>/ (ingested whole), API uploads below it
API_UPLOADS = "api/uploads"  # one record per API upload (lifecycle/uploads.py)
API_TRAININGS = "api/trainings"  # one record per training the API launched (lifecycle/callbacks.py)
API_OUTBOX = "api/outbox"  # signed callbacks waiting for delivery
API_DEAD = "api/outbox-dead"  # callbacks given up on after every retry
# An API upload's folder name (its id): told apart from a user's own subfolder of a drop, which
# the drop's ingest and the discovery sensor leave to the upload's own `complete`.
UPLOAD_ID = re.compile(r"^upload-[0-9a-f]{32}$")


def dataset_prefix(style: str, dataset_hash: str) -> str:
    """Folder of one dataset version: ``datasets/<style>/<hash>/``."""
    return f"{DATASETS}/{validate_style(style)}/{_hex(dataset_hash)}/"


def dataset_manifest_key(style: str, dataset_hash: str) -> str:
    return dataset_prefix(style, dataset_hash) + "manifest.json"


def lora_prefix(style: str) -> str:
    return f"{LORAS}/{validate_style(style)}/"


def lora_key(style: str, version_number: int) -> str:
    """``loras/<style>/<style>_v<N>.safetensors``."""
    return lora_prefix(style) + lora_filename(style, version_number)


def model_card_key(style: str, version_number: int) -> str:
    """``loras/<style>/<style>_v<N>.md``: the version's model card, beside its files."""
    return lora_key(style, version_number).removesuffix(".safetensors") + ".md"


def alias_pointer_key(style: str, alias: str) -> str:
    """``loras/<style>/<style>@<alias>.json``: the alias's published pointer, one fixed URL an app
    reads to follow promotions and rollbacks (registry_store/alias_pointers.py)."""
    return f"{lora_prefix(style)}{style}@{alias}.json"


def companion_key(style: str, version_number: int, suffix: str) -> str:
    """``loras/<style>/<style>_v<N>_<suffix>.safetensors``: the version's file in its second
    layout (``kohya``), published beside the main file and before it."""
    return lora_prefix(style) + companion_filename(style, version_number, suffix)


def run_marker_prefix(style: str, version: str) -> str:
    """``runs/<style>/<version>/``: the start markers of a version's jobs."""
    if not _RUN_SEGMENT.fullmatch(version):
        raise ValueError(f"invalid version name {version!r} for a run marker")
    return f"{RUNS}/{validate_style(style)}/{version}/"


def run_marker_key(style: str, version: str, job_id: str) -> str:
    """``runs/<style>/<version>/<job_id>.json``, written by the worker when a job starts."""
    if not _RUN_SEGMENT.fullmatch(job_id):
        raise ValueError(f"invalid job id {job_id!r} for a run marker")
    return run_marker_prefix(style, version) + f"{job_id}.json"


def checkpoint_prefix(style: str, version: str, request_id: str) -> str:
    """``checkpoints/<style>/<version>/<request id>/`` (the id hashed if it is not key-safe).

    Keyed by the request, never by the job id: a RunPod retry (``-e2`` …) of the same
    request resumes from them, possibly on another machine."""
    rid = (
        request_id
        if _CHECKPOINT_SEGMENT.fullmatch(request_id) and request_id not in (".", "..")
        else ("h-" + hashlib.sha256(request_id.encode()).hexdigest()[:32])
    )
    safe_version = (
        version
        if _CHECKPOINT_SEGMENT.fullmatch(version) and version not in (".", "..")
        else ("h-" + hashlib.sha256(version.encode()).hexdigest()[:16])
    )
    return f"{CHECKPOINTS}/{validate_style(style)}/{safe_version}/{rid}/"


def comparison_key(style: str, first: str, second: str) -> str:
    """``comparisons/<style>/<V1>_vs_<V2>.png``: two versions rendered side by side."""
    for version in (first, second):
        if not _RUN_SEGMENT.fullmatch(version):
            raise ValueError(f"invalid version name {version!r} for a comparison")
    return f"{COMPARISONS}/{validate_style(style)}/{first}_vs_{second}.png"


def upload_prefix(style: str, upload_id: str) -> str:
    """``incoming/<style>/<upload id>/``: where an API upload's files are PUT."""
    return f"{INCOMING}/{validate_style(style)}/{_upload_id(upload_id)}/"


def upload_record_key(upload_id: str) -> str:
    """``api/uploads/<upload id>.json``: the upload's declared files and state."""
    return f"{API_UPLOADS}/{_upload_id(upload_id)}.json"


def in_api_upload(relative: str) -> bool:
    """Whether a key below ``incoming/<style>/`` (given relative to it) lies in an API upload's folder."""
    return "/" in relative and UPLOAD_ID.match(relative.split("/", 1)[0]) is not None


def _upload_id(value: str) -> str:
    if not UPLOAD_ID.match(value):
        raise ValueError(f"invalid upload id {value!r}: expected upload-<32 hex digits>")
    return value


def registry_key(style: str) -> str:
    """``registry/<style>/training_versions.json``."""
    return f"{REGISTRY}/{validate_style(style)}/training_versions.json"


def _hex(value: str) -> str:
    if not value or not all(c in "0123456789abcdef" for c in value):
        raise ValueError(f"dataset hash must be lowercase hex, got {value!r}")
    return value
