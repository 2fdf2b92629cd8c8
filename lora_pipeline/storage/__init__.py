"""Object storage: one protocol, an S3 and a local-directory backend. Dagster-free."""

from lora_pipeline.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    StoreUnavailable,
    StoredObject,
    validate_key,
)

__all__ = [
    "InvalidKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PreconditionFailed",
    "StorageError",
    "StoreUnavailable",
    "StoredObject",
    "validate_key",
]
