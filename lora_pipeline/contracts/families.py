"""Which model family a base model is, from its diffusers config: the one table both sides read.

The worker (``worker/family.py``) reads a base model's folder through ``family_from_config``
before it trains, and the orchestrator (``lifecycle/base_models.py``) does the same before it
launches anything, so a base no family trains, or a base of another family than the run names,
is refused with the same words on both sides: at launch when the base can be read there (a name
built in code, a local folder, ``store:<prefix>``), on the worker otherwise (a hub id).

Pure and torch-free: callers read the JSON (``config`` reads a component's config file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, get_args

from lora_pipeline.contracts.training import TINY_MODELS, FamilyChoice, ModelFamily

ConfigReader = Callable[[str], Mapping[str, Any]]  # "unet/config.json" → its JSON object

FAMILIES: tuple[ModelFamily, ...] = get_args(ModelFamily)
# The flow-matching transformers (their timesteps can be shifted: TrainingParams.timestep_shift).
FLOW_FAMILIES: frozenset[ModelFamily] = frozenset({"flux1", "sd3", "flux2-klein", "z-image", "qwen-image"})

# model_index.json's ``_class_name`` → the family that trains it. SD 1.x and 2.x share their
# pipelines (``family_from_config`` tells them apart by the UNet); an SDXL UNet under another
# pipeline name is SDXL too.
PIPELINE_FAMILIES: Mapping[str, ModelFamily] = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionImg2ImgPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux1",
    "FluxImg2ImgPipeline": "flux1",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "Flux2KleinPipeline": "flux2-klein",
    "Flux2KleinKVPipeline": "flux2-klein",
    "Flux2KleinInpaintPipeline": "flux2-klein",
    "ZImagePipeline": "z-image",
    "ZImageImg2ImgPipeline": "z-image",
    "QwenImagePipeline": "qwen-image",
    "QwenImageImg2ImgPipeline": "qwen-image",
}


class BaseModelRefused(ValueError):
    """A base model no family trains, or one of another family than the run names: one line
    that names the base model (and the family asked for)."""


def family_from_config(index: Mapping[str, Any], config: ConfigReader, base_model: str) -> ModelFamily:
    """The family of the base model whose ``model_index.json`` is ``index``. Raises
    BaseModelRefused naming ``base_model`` when no family trains it."""
    pipeline = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(pipeline) if isinstance(pipeline, str) else None
    if family in (None, "sd1") and "unet" in index:
        unet = config("unet/config.json")
        if unet.get("addition_embed_type") == "text_time":
            family = "sdxl"
        elif family == "sd1" and unet.get("cross_attention_dim") == 1024:
            family = "sd2"  # OpenCLIP ViT-H: 1024-wide cross-attention
    if family is None:
        raise BaseModelRefused(
            f"base_model {base_model!r} is a {pipeline!r}, which no family trains "
            f"(supported: {', '.join(sorted(set(PIPELINE_FAMILIES)))})"
        )
    if family == "sdxl" and "text_encoder_2" not in index:
        raise BaseModelRefused(f"base_model {base_model!r} looks like SDXL but has no text_encoder_2")
    return family


def tiny_model_family(base_model: str) -> ModelFamily | None:
    """The family of a model built in code (``tiny`` is SD 1.x, ``tiny-<family>`` that family), or
    None when ``base_model`` is none of ``TINY_MODELS``."""
    if base_model not in TINY_MODELS:
        return None
    family = "sd1" if base_model == "tiny" else base_model.removeprefix("tiny-")
    if family not in FAMILIES:
        raise AssertionError(f"TINY_MODELS names {base_model!r}, whose family {family!r} is unknown")
    return family


def check_family(requested: FamilyChoice | str, found: ModelFamily, base_model: str) -> ModelFamily:
    """``found``, unless the run named another family (``auto``: any). Raises BaseModelRefused
    naming both."""
    if requested not in ("auto", found):
        raise BaseModelRefused(
            f"model_family {requested!r} does not match base_model {base_model!r}, a {found!r} model"
        )
    return found


def check_family_name(requested: str) -> FamilyChoice:
    """``requested`` if it is ``auto`` or a family's name; raises BaseModelRefused listing them."""
    if requested != "auto" and requested not in FAMILIES:
        raise BaseModelRefused(f"model_family {requested!r} is unknown; known: auto, {', '.join(FAMILIES)}")
    return requested  # type: ignore[return-value]  # one of FamilyChoice's values, checked above


def check_timestep_shift(shift: float | None, family: ModelFamily, base_model: str) -> None:
    """A timestep shift is a flow-matching setting: refused for a UNet family's base model."""
    if shift is not None and family not in FLOW_FAMILIES:
        raise BaseModelRefused(
            f"timestep_shift applies to the flow-matching families only; base_model {base_model!r} is {family!r}"
        )
