"""The model families the worker trains, one module each (see ``base.py`` for the protocol)."""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.worker.families.base import Family, Loaded
from lora_pipeline.worker.families.flux1 import Flux1
from lora_pipeline.worker.families.flux2_klein import Flux2Klein
from lora_pipeline.worker.families.qwen_image import QwenImage
from lora_pipeline.worker.families.sd import StableDiffusion, StableDiffusion2
from lora_pipeline.worker.families.sd3 import StableDiffusion3
from lora_pipeline.worker.families.sdxl import StableDiffusionXL
from lora_pipeline.worker.families.z_image import ZImage

# Every family the worker trains; which one a base model is: contracts/families.py.
FAMILIES: tuple[type[Family], ...] = (
    StableDiffusionXL,
    StableDiffusion,
    StableDiffusion2,
    Flux1,
    StableDiffusion3,
    ZImage,
    Flux2Klein,
    QwenImage,
)
_BY_NAME: dict[str, type[Family]] = {cls.name: cls for cls in FAMILIES}


def family_class(name: str) -> type[Family]:
    """The family called ``name`` (``sd1``, ``sdxl``, ``flux1`` …)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


def family_for(name: str, model_dir: Path) -> Family:
    """The family ``name``'s rules for the base model in ``model_dir``."""
    return family_class(name)(model_dir)


__all__ = ["FAMILIES", "Family", "Loaded", "family_class", "family_for"]
