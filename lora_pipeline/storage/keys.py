"""The object-store layout (DESIGN.md, "Object store layout"), in one place.

Every key the pipeline reads or writes is built here, from validated style names,
so no other module concatenates paths and nothing can escape its prefix.
"""

from __future__ import annotations

from lora_pipeline.registry.names import lora_filename, validate_style

DATASETS = "datasets"
LORAS = "loras"
REGISTRY = "registry"
WEBHOOK_INBOX = "webhooks/inbox"
WEBHOOK_PROCESSED = "webhooks/processed"
JOBS = "jobs"
INDEX_KEY = f"{REGISTRY}/index.json"


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


def registry_key(style: str) -> str:
    """``registry/<style>/training_versions.json``."""
    return f"{REGISTRY}/{validate_style(style)}/training_versions.json"


def _hex(value: str) -> str:
    if not value or not all(c in "0123456789abcdef" for c in value):
        raise ValueError(f"dataset hash must be lowercase hex, got {value!r}")
    return value
