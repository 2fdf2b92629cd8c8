"""The model families the worker trains, one module each (see ``base.py`` for the protocol)."""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.worker.families.base import Family, Loaded
from lora_pipeline.worker.families.sd import StableDiffusion, StableDiffusion2
from lora_pipeline.worker.families.sdxl import StableDiffusionXL

# In detection order: the first whose ``detect`` answers names the family.
FAMILIES: tuple[type[Family], ...] = (StableDiffusionXL, StableDiffusion, StableDiffusion2)
_BY_NAME: dict[str, type[Family]] = {cls.name: cls for cls in FAMILIES}


def family_for(name: str, model_dir: Path) -> Family:
    """The family ``name`` of the base model in ``model_dir``."""
    try:
        return _BY_NAME[name](model_dir)
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


__all__ = ["FAMILIES", "Family", "Loaded", "family_for"]
