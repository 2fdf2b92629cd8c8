"""The LoRA files of a version: the diffusers/peft layout and the kohya layout, each with a
header that tells the truth about it.

* ``write_lora_file``: the diffusers/peft layout, written by diffusers' own
  ``save_lora_weights`` (so ``load_lora_weights`` reads it, whatever diffusers' layout
  rules are this year), with diffusers' ``lora_adapter_metadata`` and our
  ``lora_pipeline.*`` provenance; text-encoder keys keep CLIP's ``text_model.`` level
  (``text_encoder.text_model.encoder.layers.0…``) as every diffusers LoRA on the hub does.
  No ``ss_*``/``modelspec.*`` keys: it is not a kohya file.
* ``write_kohya_file``: the kohya/A1111/ComfyUI layout derived from it (sd-scripts'
  module names, ``.lora_down``/``.lora_up`` + ``.alpha``; see worker/kohya.py), with
  kohya's ``ss_*`` and SAI's ``modelspec.*`` keys valued as sd-scripts writes them,
  sd-scripts' ``sshs_*`` hashes, and the same provenance.

Both carry ``lora_pipeline.tensors_sha256``, the SHA-256 of their tensor data, which the
registry records and ``registry download`` verifies. Header values are strings.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from lora_pipeline.contracts.training import ModelFamily, TrainingParams
from lora_pipeline.registry.layouts import CHECKSUM_KEY, DIFFUSERS, KOHYA
from lora_pipeline.registry_store.lora_files import verify_local_file

META_PREFIX = "lora_pipeline."
LAYOUT_KEY = META_PREFIX + "layout"  # kohya | diffusers: which file of the pair this is

# The component prefixes diffusers' save_lora_weights writes.
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_OPTIMIZER_CLASSES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw_fused": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
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
    prediction_type: str = "epsilon"  # the base model's scheduler: epsilon or v_prediction; flow
    variant: str = ""  # which model of the family, where the header tells them apart (FLUX.1: dev, schnell)
    quantize_base: str = "none"  # how the frozen denoiser was stored while this LoRA trained on it
    # The levers as trained where the params left them on "auto" (None: as the params say).
    gradient_checkpointing: bool | None = None
    mixed_precision: str | None = None
    memory_plan: str = ""  # why the planner chose them

    @property
    def trained_checkpointing(self) -> bool:
        chosen = self.gradient_checkpointing
        return bool(self.params.gradient_checkpointing) if chosen is None else chosen

    @property
    def trained_precision(self) -> str:
        return self.mixed_precision or self.params.mixed_precision

    @property
    def output_name(self) -> str:
        """The version's file stem (``geo_v3``): sd-scripts' output name and modelspec title."""
        return f"{self.style}_v{self.version.lstrip('vV')}"


def provenance_metadata(facts: ArtifactFacts) -> dict[str, str]:
    """Our ``lora_pipeline.*`` header keys, on both layouts: string values only."""
    p = facts.params
    alpha = p.effective_alpha
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
        "started_at": facts.started_at.astimezone(UTC).isoformat(),
        "prediction_type": facts.prediction_type,
        "variant": facts.variant,
        "quantize_base": facts.quantize_base,
        "memory_plan": facts.memory_plan,
        "tag_frequency": json.dumps(dict(facts.tag_frequency), sort_keys=True),
        "params": p.model_dump_json(),
    }
    # As trained, where the worker said (params on "auto" decided); else the params tell.
    if facts.gradient_checkpointing is not None:
        ours["gradient_checkpointing"] = str(facts.gradient_checkpointing).lower()
    if facts.mixed_precision is not None:
        ours["mixed_precision"] = facts.mixed_precision
    return {META_PREFIX + key: value for key, value in ours.items()}


def facts_from_provenance(metadata: Mapping[str, str]) -> ArtifactFacts:
    """The facts ``provenance_metadata`` wrote, read back from a header: everything the kohya
    file's header needs is in the diffusers file's, so that file alone determines it."""

    def value(key: str) -> str:
        found = metadata.get(META_PREFIX + key)
        if found is None:
            raise ValueError(f"not a lora_pipeline LoRA: its header has no {META_PREFIX + key}")
        return found

    family = value("family")
    if family not in get_args(ModelFamily):
        raise ValueError(f"{META_PREFIX}family: unknown family {family!r}")
    return ArtifactFacts(
        style=value("style"),
        version=value("version"),
        job_id=value("job_id"),
        request_id=value("request_id"),
        dataset_hash=value("dataset_hash"),
        base_model=value("base_model"),
        family=family,  # type: ignore[arg-type]  # checked against ModelFamily above
        params=TrainingParams.model_validate_json(value("params")),
        steps=int(value("steps")),
        num_train_images=int(value("num_train_images")),
        tag_frequency=json.loads(value("tag_frequency")),
        training_seconds=float(value("training_time")),
        started_at=datetime.fromisoformat(value("started_at")),
        finished_at=datetime.fromisoformat(value("created_at")),
        final_loss=float(value("final_loss")) if value("final_loss") else None,
        prediction_type=value("prediction_type"),
        variant=metadata.get(META_PREFIX + "variant", ""),  # files before FLUX.1 have none
        quantize_base=metadata.get(META_PREFIX + "quantize_base", "none"),  # nor before quantize_base
        gradient_checkpointing=_flag(metadata.get(META_PREFIX + "gradient_checkpointing")),
        mixed_precision=metadata.get(META_PREFIX + "mixed_precision"),
        memory_plan=metadata.get(META_PREFIX + "memory_plan", ""),
    )


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "true"


def kohya_metadata(facts: ArtifactFacts) -> dict[str, str]:
    """kohya's ``ss_*`` and SAI's ``modelspec.*`` keys, valued as sd-scripts' ``train_network.py``
    writes them (``str()`` of its values: alpha as a float, timestamps in seconds with their
    fraction, the base model's folder name), for the kohya layout only."""
    # Long on purpose: one line per kohya/modelspec key, the whole table sd-scripts writes in one view.
    from lora_pipeline.worker.families import family_class

    p = facts.params
    lr = str(float(p.learning_rate))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(p.rank),
        "ss_network_alpha": str(float(p.effective_alpha)),
        "ss_sd_model_name": base_model_name(facts.base_model),
        "ss_num_train_images": str(facts.num_train_images),
        "ss_num_reg_images": "0",
        "ss_steps": str(facts.steps),
        "ss_max_train_steps": str(facts.steps),
        "ss_learning_rate": lr,
        "ss_unet_lr": lr,
        "ss_text_encoder_lr": lr if p.train_text_encoder else "0",
        "ss_lr_scheduler": p.lr_scheduler,
        "ss_lr_warmup_steps": str(p.lr_warmup_steps),
        "ss_optimizer": _OPTIMIZER_CLASSES.get(p.optimizer, p.optimizer),
        "ss_max_grad_norm": str(float(p.max_grad_norm)),
        "ss_batch_size_per_device": str(p.train_batch_size),
        "ss_total_batch_size": str(p.train_batch_size * p.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(p.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(facts.trained_checkpointing),
        "ss_mixed_precision": facts.trained_precision,
        "ss_full_fp16": "False",
        "ss_cache_latents": "True",
        "ss_clip_skip": "None",
        "ss_resolution": f"({p.resolution}, {p.resolution})",
        "ss_enable_bucket": str(p.enable_bucketing),
        "ss_seed": str(p.seed),
        "ss_output_name": facts.output_name,
        "ss_training_started_at": str(facts.started_at.timestamp()),
        "ss_training_finished_at": str(facts.finished_at.timestamp()),
        "ss_tag_frequency": json.dumps({facts.style: dict(facts.tag_frequency)}),
        "ss_training_comment": f"lora_pipeline dataset {facts.dataset_hash}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": facts.output_name,
        "modelspec.resolution": f"{p.resolution}x{p.resolution}",
        "modelspec.date": facts.finished_at.astimezone(UTC).replace(microsecond=0).isoformat(),
    }
    for key, value in family_class(facts.family).kohya_model_version(facts.variant, facts.prediction_type).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    if p.trigger_word:
        metadata["modelspec.trigger_phrase"] = p.trigger_word
    return metadata


def base_model_name(base_model: str) -> str:
    """``ss_sd_model_name`` as sd-scripts writes it: a local model's folder or file name, a hub
    id as given (``store:models/sd15`` is the store's folder ``sd15``)."""
    from lora_pipeline.worker.base_model import STORE_SCHEME, describe_source

    try:
        source = describe_source(base_model)
    except ValueError:
        source = "local"
    if source == "hub":
        return base_model
    path = base_model[len(STORE_SCHEME) :] if source == "store" else base_model
    return Path(path.rstrip("/")).name or base_model


def write_lora_file(
    path: Path,
    family: ModelFamily,
    denoiser_lora: Mapping[str, object],
    metadata: Mapping[str, str],
    *,
    text_encoder_lora: Mapping[str, object] | None = None,
    text_encoder_2_lora: Mapping[str, object] | None = None,
    adapter_configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """The diffusers/peft layout: diffusers' ``save_lora_weights``, then ``metadata`` (our
    provenance), the layout and the tensor checksum added to its header.

    ``adapter_configs`` (peft ``LoraConfig.to_dict()`` per component) go into the
    header as diffusers' ``lora_adapter_metadata``, so loading applies alpha/rank.
    Text-encoder module paths get CLIP's ``text_model.`` level when the encoder has none
    (transformers 5's ``CLIPTextModel``): diffusers loads both, other readers only that one.
    """
    from safetensors import safe_open

    import diffusers

    from lora_pipeline.worker.families import family_class

    rules = family_class(family)
    with tempfile.TemporaryDirectory() as tmp:
        configs = {k: _jsonable(v) for k, v in (adapter_configs or {}).items()}
        layers: dict[str, Mapping[str, object]] = {rules.denoiser_component: denoiser_lora}
        for component, encoder_lora in zip(
            rules.text_encoder_components, (text_encoder_lora, text_encoder_2_lora), strict=False
        ):
            if encoder_lora:
                layers[component] = {_with_text_model(k): v for k, v in encoder_lora.items()}
        kwargs: dict[str, Any] = {"safe_serialization": True}
        for component, component_layers in layers.items():
            kwargs[f"{component}_lora_layers"] = dict(component_layers)
            if component in configs:
                kwargs[f"{component}_lora_adapter_metadata"] = configs[component]
        # The family's pipeline class's: signatures differ by the components they name.
        save_lora_weights = getattr(diffusers, rules.pipeline_class).save_lora_weights
        save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        saved = Path(tmp) / "lora.safetensors"
        with safe_open(str(saved), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = dict(handle.metadata() or {})
    header.update(metadata)
    header[LAYOUT_KEY] = DIFFUSERS
    return _save_with_checksum(tensors, path, header)


def write_kohya_file(diffusers_file: Path, path: Path, *, denoiser_config: Mapping[str, Any] | None) -> Path:
    """The kohya/A1111/ComfyUI layout of the LoRA in ``diffusers_file`` (one ``write_lora_file``
    wrote): the same tensors under sd-scripts' module names (``<name>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``).

    A function of that file alone (and the base model's denoiser config: the UNet's places
    SDXL modules in SGM's blocks, FLUX.1's transformer's sizes its fused layers; the family
    names the modules, ``Family.kohya_tensors``), so it can be derived again from a published
    diffusers file. The header has the same ``lora_pipeline.*`` provenance, ``kohya_metadata`` of the
    facts it records, sd-scripts' ``sshs_model_hash``/``sshs_legacy_hash`` computed its
    way, the layout and the tensor checksum. Raises KohyaNameError for a module the kohya
    layout cannot name.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_pipeline.worker.families import family_class

    with safe_open(str(diffusers_file), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        source = dict(handle.metadata() or {})
    facts = facts_from_provenance(source)
    rules = family_class(facts.family)
    tensors = rules.kohya_tensors(_lora_modules(state), facts.params.effective_alpha, denoiser_config)
    header = {k: v for k, v in source.items() if k.startswith(META_PREFIX) and k not in (LAYOUT_KEY, CHECKSUM_KEY)}
    header.update(kohya_metadata(facts))
    # sd-scripts hashes a serialization whose header holds only the ss_* keys (networks/lora.py,
    # train_util.precalculate_safetensors_hashes): model hash = SHA-256 of the tensor data,
    # legacy hash = first 8 hex of the SHA-256 of the 64 KiB at offset 1 MiB.
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "ss_only.safetensors"
        save_file(tensors, str(probe), metadata={k: v for k, v in header.items() if k.startswith("ss_")})
        _, model_hash, _ = verify_local_file(probe)
        with open(probe, "rb") as handle:
            handle.seek(0x100000)
            legacy_hash = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    header.update({"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, LAYOUT_KEY: KOHYA})
    return _save_with_checksum(tensors, path, header, digest=model_hash)  # the same tensor data


_LORA_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}


def _lora_modules(state: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, module path) → {"down", "up"} of a diffusers-layout state dict (diffusers'
    own suffixes and peft's are both read)."""
    modules: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in _LORA_SUFFIXES if rest.endswith(s)), None)
        if component not in _COMPONENTS or suffix is None:
            raise ValueError(f"{key!r} is not a LoRA weight of the UNet or a text encoder")
        modules.setdefault((component, rest[: -len(suffix)]), {})[_LORA_SUFFIXES[suffix]] = tensor
    for (component, module), pair in modules.items():
        if set(pair) != {"down", "up"} or pair["down"].shape[0] != pair["up"].shape[1]:
            raise ValueError(f"{component}.{module}: needs a down and an up matrix of one rank")
    return modules


def _with_text_model(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


def _save_with_checksum(
    tensors: Mapping[str, Any], path: Path, header: dict[str, str], *, digest: str | None = None
) -> Path:
    """Save ``tensors`` with ``header`` plus the SHA-256 of their tensor data (the bytes after
    the header, which the header does not change; ``digest`` when already known), checked
    once written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if digest is None:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            probe = Path(tmp) / "data.safetensors"
            save_file(dict(tensors), str(probe))
            _, digest, _ = verify_local_file(probe)
    save_file(dict(tensors), str(path), metadata={**header, CHECKSUM_KEY: digest})
    if verify_local_file(path)[1] != digest:
        raise RuntimeError(f"{path}: tensor data changed between writes; not publishing it")
    return path


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
