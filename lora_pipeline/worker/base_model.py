"""Where the base model comes from: built in code, a local folder, the object store or a hub.

Whatever the source, training receives a local diffusers folder, so there is one
loading path. A model in the object store (``store:<prefix>``) is downloaded once
per worker into the cache; on RunPod a network volume mounted as the cache (or a
folder baked into the image) makes that a no-op after the first job.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.tiny_model import default_cache_dir, ensure_tiny_model

STORE_SCHEME = "store:"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # the hub caps names at 96


def describe_source(base_model: str) -> str:
    """``tiny`` | ``store`` | ``local`` | ``hub``; raises WorkerInputError when it is none of them."""
    if base_model == "tiny":
        return "tiny"
    if base_model.startswith(STORE_SCHEME):
        if not base_model[len(STORE_SCHEME) :].strip("/"):
            raise WorkerInputError("base_model: 'store:' needs a key prefix, e.g. 'store:models/sd15'")
        return "store"
    if Path(base_model).expanduser().is_dir():
        return "local"
    if base_model.startswith(("/", ".", "~")):
        raise WorkerInputError(f"base_model: local folder {base_model!r} does not exist")
    if _HUB_ID.fullmatch(base_model):
        return "hub"
    raise WorkerInputError(
        f"base_model: {base_model!r} is not 'tiny', an existing folder, 'store:<prefix>' or a hub id"
    )


def resolve_base_model(base_model: str, store: ObjectStore | None, cache_dir: Path | None = None) -> Path:
    """A local diffusers folder for ``base_model``."""
    cache = cache_dir or default_cache_dir()
    source = describe_source(base_model)
    if source == "tiny":
        return ensure_tiny_model()
    if source == "local":
        return Path(base_model).expanduser()
    if source == "store":
        if store is None:
            raise WorkerInputError("base_model: 'store:' needs an object store")
        return _from_store(store, base_model[len(STORE_SCHEME) :].strip("/") + "/", cache)
    return _from_hub(base_model, cache)


def _from_store(store: ObjectStore, prefix: str, cache: Path) -> Path:
    from lora_pipeline.storage.transfer import download_prefix

    if store.head(prefix + "model_index.json") is None:
        raise WorkerInputError(
            f"base_model: no diffusers model at {prefix!r} in {store.describe()} (model_index.json missing)"
        )
    digest = hashlib.sha256(f"{store.describe()}|{prefix}".encode()).hexdigest()[:16]
    target = cache / "store-models" / digest
    download_prefix(store, prefix, target)
    return target


def _from_hub(repo_id: str, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            cache_dir=str(cache / "hub"),
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=["*.ckpt", "*ema*", "*.fp16.safetensors", "*non_ema*"],
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported as the request's problem
        raise WorkerInputError(f"base_model: could not download {repo_id!r} from the hub: {exc}") from None
    return Path(folder)
