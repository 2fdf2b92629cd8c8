"""Which family a base model belongs to, read from its own config.

Training differs per family (SDXL has two text encoders and extra time
conditioning; SD2 predicts velocity; the transformers match flows), so the worker
decides from the model folder rather than trusting the request, and refuses a model
it does not know how to train. ``contracts/families.py`` holds the rules (the orchestrator's
launch check reads the same); this module reads the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_pipeline.contracts.families import BaseModelRefused, family_from_config
from lora_pipeline.contracts.families import check_family as contract_check_family
from lora_pipeline.contracts.training import FamilyChoice, ModelFamily
from lora_pipeline.worker.errors import WorkerInputError


def detect_family(model_dir: Path, base_model: str | None = None) -> ModelFamily:
    """The family of the base model in ``model_dir``, from ``model_index.json`` and the
    component configs, by the table the orchestrator's launch check reads too
    (``contracts/families.py``). ``base_model``: what the request named, for the message."""
    index = _read_json(model_dir / "model_index.json", "model_index.json")
    try:
        return family_from_config(
            index, lambda relative: _read_json(model_dir / relative, relative), base_model or str(model_dir)
        )
    except BaseModelRefused as exc:
        raise WorkerInputError(str(exc)) from None


def prediction_type(model_dir: Path) -> str:
    """What the base model's UNet predicts (``epsilon``, ``v_prediction``…), from its scheduler
    config: the training target, and what a kohya header records (SD 2.x 768-v)."""
    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return "epsilon"  # diffusers' default
    value = _read_json(path, "scheduler/scheduler_config.json").get("prediction_type")
    return value if isinstance(value, str) and value else "epsilon"


def denoiser_config(model_dir: Path) -> dict:
    """The base model's ``unet/config.json`` (block layout, for the kohya module names), or its
    ``transformer/config.json`` (widths of the layers the kohya layout fuses)."""
    for relative in ("unet/config.json", "transformer/config.json"):
        if (model_dir / relative).is_file():
            return _read_json(model_dir / relative, relative)
    raise WorkerInputError(f"base model at {model_dir} has neither unet/config.json nor transformer/config.json")


def check_family(detected: ModelFamily, requested: FamilyChoice, base_model: str) -> ModelFamily:
    """The detected family, unless the request named a different one (one line naming both)."""
    try:
        return contract_check_family(requested, detected, base_model)
    except BaseModelRefused as exc:
        raise WorkerInputError(str(exc)) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkerInputError(
            f"base model at {_model_dir_of(path, what)} is not a diffusers folder: {what} is missing"
        ) from None
    except (OSError, ValueError) as exc:
        raise WorkerInputError(f"base model file {what} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise WorkerInputError(f"base model file {what} is not a JSON object")
    return data


def _model_dir_of(path: Path, relative: str) -> Path:
    """The model folder ``path`` (the file ``relative`` inside it) belongs to."""
    for _ in Path(relative).parts:
        path = path.parent
    return path
