"""The launch check: a base model no family trains, or one of another family than the run names,
is refused before any run work, with one line naming both.

The rules are ``contracts/families.py``'s, the worker's own; this module reads what the
orchestrator can read of the base model: a name built in code (its family is known), a local
folder's ``model_index.json`` and component configs, a ``store:<prefix>`` model's in the object
store. A hub id (or a folder that exists only on the worker) cannot be read here: its family is
unknown at launch (None), and the worker refuses a mismatch when it has loaded the config.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lora_pipeline.contracts.families import (
    BaseModelRefused,
    check_family,
    check_family_name,
    check_timestep_shift,
    family_from_config,
    tiny_model_family,
)
from lora_pipeline.contracts.training import ModelFamily
from lora_pipeline.storage import ObjectStore
from lora_pipeline.storage.base import ObjectNotFound

STORE_SCHEME = "store:"  # the worker's spelling (worker/base_model.py), read the same here


def launch_family(
    base_model: str,
    model_family: str = "auto",
    *,
    store: ObjectStore | None = None,
    timestep_shift: float | None = None,
) -> ModelFamily | None:
    """The family ``base_model`` is, as far as the orchestrator can read it (None: only the
    worker can tell). Raises BaseModelRefused, one line, for an unknown ``model_family``, a base
    no family trains, a base of another family than ``model_family``, or a timestep shift on a
    UNet family."""
    requested = check_family_name(model_family)
    found = known_family(base_model, store)
    if found is None:
        return None if requested == "auto" else requested
    check_timestep_shift(timestep_shift, found, base_model)
    return check_family(requested, found, base_model)


def known_family(base_model: str, store: ObjectStore | None = None) -> ModelFamily | None:
    """The family of ``base_model`` read from its config, or None when it cannot be read here."""
    tiny = tiny_model_family(base_model)
    if tiny is not None:
        return tiny
    reader = _config_reader(base_model, store)
    if reader is None:
        return None
    index = reader("model_index.json")
    if index is None:
        raise BaseModelRefused(f"base_model {base_model!r} is not a diffusers model: it has no model_index.json")

    def config(relative: str) -> Mapping[str, Any]:
        return reader(relative) or {}

    return family_from_config(index, config, base_model)


def _config_reader(base_model: str, store: ObjectStore | None) -> Callable[[str], dict | None] | None:
    """Reads a config file of ``base_model`` (None when the file is missing), or None when its
    files are out of reach: a hub id, a folder this machine does not have, a store we were not given."""
    if base_model.startswith(STORE_SCHEME):
        prefix = base_model[len(STORE_SCHEME) :].strip("/")
        if store is None or not prefix or store.head(f"{prefix}/model_index.json") is None:
            return None  # the worker may read another store (its LORA_STORAGE_URL): it decides
        return lambda relative: _store_json(store, f"{prefix}/{relative}", base_model)
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return None
    return lambda relative: _file_json(folder / relative, base_model)


def _file_json(path: Path, base_model: str) -> dict | None:
    try:
        return _parse(path.read_bytes(), base_model, path.name)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaseModelRefused(f"base_model {base_model!r}: {path.name} is unreadable: {exc}") from None


def _store_json(store: ObjectStore, key: str, base_model: str) -> dict | None:
    try:
        return _parse(store.get(key).data, base_model, key.rsplit("/", 1)[-1])
    except ObjectNotFound:
        return None


def _parse(data: bytes, base_model: str, name: str) -> dict:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise BaseModelRefused(f"base_model {base_model!r}: {name} is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise BaseModelRefused(f"base_model {base_model!r}: {name} is not a JSON object")
    return parsed
