"""The LoRA file: diffusers/peft key naming, training facts in the safetensors header.

The file is written by diffusers' own ``save_lora_weights`` (so ``load_lora_weights``
reads it, whatever diffusers' layout rules are this year) and then re-written with
the header metadata added: our ``lora_pipeline.*`` provenance keys, and kohya's
``ss_*`` and ``modelspec.*`` keys where they name the same fact, because LoRA
managers in the ComfyUI/A1111 world read those. Safetensors metadata values must
be strings.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_pipeline.worker.schema import ModelFamily, TrainingParams

META_PREFIX = "lora_pipeline."

# kohya's ss_base_model_version and SAI modelspec.architecture per family.
_KOHYA_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


@dataclass(frozen=True)
class ArtifactFacts:
    """Everything the header records about one trained LoRA."""

    style: str
    version: str
    job_id: str
    request_id: str
    dataset_hash: str
    base_model: str
    family: ModelFamily
    params: TrainingParams
    steps: int
    num_train_images: int
    tag_frequency: Mapping[str, int]
    training_seconds: float
    started_at: datetime
    finished_at: datetime
    final_loss: float | None


def lora_metadata(facts: ArtifactFacts) -> dict[str, str]:
    """The header's ``__metadata__``: string values only."""
    p = facts.params
    alpha = p.effective_alpha
    resolution = f"{p.resolution}x{p.resolution}"
    ours = {
        "style": facts.style,
        "version": facts.version,
        "job_id": facts.job_id,
        "request_id": facts.request_id,
        "dataset_hash": facts.dataset_hash,
        "base_model": facts.base_model,
        "family": facts.family,
        "rank": str(p.rank),
        "alpha": _num(alpha),
        "steps": str(facts.steps),
        "trigger_word": p.trigger_word or "",
        "training_time": f"{facts.training_seconds:.1f}",
        "num_train_images": str(facts.num_train_images),
        "resolution": str(p.resolution),
        "learning_rate": _num(p.learning_rate),
        "target_modules": ",".join(p.target_modules),
        "train_text_encoder": str(p.train_text_encoder).lower(),
        "final_loss": "" if facts.final_loss is None else f"{facts.final_loss:.6f}",
        "created_at": facts.finished_at.astimezone(UTC).isoformat(),
        "params": p.model_dump_json(),
    }
    metadata = {META_PREFIX + key: value for key, value in ours.items()}
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(p.rank),
            "ss_network_alpha": _num(alpha),
            "ss_base_model_version": _KOHYA_BASE[facts.family],
            "ss_v2": str(facts.family == "sd2"),
            "ss_sd_model_name": facts.base_model,
            "ss_num_train_images": str(facts.num_train_images),
            "ss_steps": str(facts.steps),
            "ss_max_train_steps": str(facts.steps),
            "ss_learning_rate": _num(p.learning_rate),
            "ss_unet_lr": _num(p.learning_rate),
            "ss_text_encoder_lr": _num(p.learning_rate) if p.train_text_encoder else "0",
            "ss_lr_scheduler": p.lr_scheduler,
            "ss_lr_warmup_steps": str(p.lr_warmup_steps),
            "ss_batch_size_per_device": str(p.train_batch_size),
            "ss_gradient_accumulation_steps": str(p.gradient_accumulation_steps),
            "ss_gradient_checkpointing": str(p.gradient_checkpointing),
            "ss_mixed_precision": p.mixed_precision,
            "ss_resolution": f"({p.resolution}, {p.resolution})",
            "ss_enable_bucket": str(p.enable_bucketing),
            "ss_seed": str(p.seed),
            "ss_output_name": f"{facts.style}_{facts.version}",
            "ss_training_started_at": f"{facts.started_at.timestamp():.0f}",
            "ss_training_finished_at": f"{facts.finished_at.timestamp():.0f}",
            "ss_tag_frequency": json.dumps({facts.style: dict(facts.tag_frequency)}),
            "ss_training_comment": f"lora_pipeline dataset {facts.dataset_hash}",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": _MODELSPEC_ARCH[facts.family],
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
            "modelspec.title": f"{facts.style} {facts.version}",
            "modelspec.resolution": resolution,
            "modelspec.date": facts.finished_at.astimezone(UTC).isoformat(),
            "modelspec.trigger_phrase": p.trigger_word or "",
        }
    )
    return metadata


def write_lora_file(
    path: Path,
    family: ModelFamily,
    unet_lora: Mapping[str, object],
    metadata: Mapping[str, str],
    *,
    text_encoder_lora: Mapping[str, object] | None = None,
    text_encoder_2_lora: Mapping[str, object] | None = None,
    adapter_configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Save with diffusers' ``save_lora_weights``, then add ``metadata`` to the header.

    ``adapter_configs`` (peft ``LoraConfig.to_dict()`` per component) go into the
    header as diffusers' ``lora_adapter_metadata``, so loading applies alpha/rank.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        configs = {k: _jsonable(v) for k, v in (adapter_configs or {}).items()}
        kwargs: dict[str, Any] = {"unet_lora_layers": dict(unet_lora), "safe_serialization": True}
        if "unet" in configs:
            kwargs["unet_lora_adapter_metadata"] = configs["unet"]
        if text_encoder_lora:
            kwargs["text_encoder_lora_layers"] = dict(text_encoder_lora)
            if "text_encoder" in configs:
                kwargs["text_encoder_lora_adapter_metadata"] = configs["text_encoder"]
        if family == "sdxl":
            from diffusers import StableDiffusionXLPipeline as Pipeline

            if text_encoder_2_lora:
                kwargs["text_encoder_2_lora_layers"] = dict(text_encoder_2_lora)
                if "text_encoder_2" in configs:
                    kwargs["text_encoder_2_lora_adapter_metadata"] = configs["text_encoder_2"]
        else:
            from diffusers import StableDiffusionPipeline as Pipeline
        Pipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        saved = Path(tmp) / "lora.safetensors"
        with safe_open(str(saved), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = dict(handle.metadata() or {})
    header.update(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def write_kohya_file(diffusers_file: Path, path: Path, alpha: float, family: ModelFamily) -> Path:
    """The kohya/A1111/ComfyUI layout (``lora_unet_…​.lora_down.weight`` + ``.alpha``).

    diffusers' own converter, as its SDXL DreamBooth script uses it; the header
    metadata is copied so managers see the same facts.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_file), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata() or {})
    kohya = convert_state_dict_to_kohya(_as_peft_names(state))
    import torch

    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))
    kohya = {_kohya_te_name(k, family): v.contiguous() for k, v in kohya.items()}
    metadata = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    save_file(kohya, str(path), metadata=metadata)
    return path


_PEFT_SUFFIXES = {
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}


def _as_peft_names(state: dict) -> dict:
    """One naming for the converter: diffusers may mix its older suffixes with peft's."""
    renamed = {}
    for key, value in state.items():
        for old, new in _PEFT_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    return renamed


def _kohya_te_name(key: str, family: ModelFamily) -> str:
    """kohya's text-encoder names: ``lora_te_text_model_encoder_…`` (SD1/2), ``lora_te1_…``/``lora_te2_…`` (SDXL).

    diffusers' converter always writes ``lora_te1`` and, with transformers 5's
    flattened ``CLIPTextModel``, no ``text_model`` level; A1111 and ComfyUI match both.
    """
    if family != "sdxl" and key.startswith("lora_te1_"):
        key = "lora_te_" + key[len("lora_te1_"):]
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if key.startswith(prefix) and not key.startswith(prefix + "text_model_"):
            return prefix + "text_model_" + key[len(prefix):]
    return key


def _jsonable(value: Any) -> Any:
    """peft configs hold sets and enums; the header wants plain JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return getattr(value, "value", str(value))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
