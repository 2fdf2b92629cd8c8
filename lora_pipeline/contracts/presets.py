"""Per-family training presets: the hyperparameters a run of a family starts from.

A run's params are, in order of precedence: what the run sets, the style's declared preset,
the tiny-model preset (models built in code train in seconds on a CPU), the family's preset
below, then ``TrainingParams``' own defaults. The params actually used are what the registry and
the LoRA's header record. Pure and torch-free: the Dagster code location reads it, and
docs/worker.md shows it (a test keeps the two equal).

Where the values come from (ostris/ai-toolkit at 27a03a91, its ``config/examples`` and the UI's
per-architecture defaults in ``ui/src/app/jobs/new/options.tsx`` / ``jobConfig.ts``):

* FLUX.1 ``train_lora_flux_24gb.yaml``, Qwen-Image ``train_lora_qwen_image_24gb.yaml``, SD3.5
  ``train_lora_sd35_large_24gb.yaml``: rank 16 (alpha 16), lr 1e-4, 2000 steps, 1024 the largest of
  their resolutions.
* FLUX.2 klein, Z-Image, SDXL, SD 1.5: no example YAML for a style LoRA with AdamW (Z-Image's
  examples train a character with Prodigy at rank 128), so the UI's defaults: rank 32, lr 1e-4,
  3000 steps; the resolution each model is made for (SD 1.5 512, SD 2.x 768-v 768, the others 1024).
* ai-toolkit trains several resolutions at once (``[512, 768, 1024]``); our data module trains one
  resolution with aspect-ratio buckets of its area (``enable_bucketing``), so a preset names one.
* Timestep shift (flow families): the family's reference, i.e. what its diffusers training script
  gets from the published scheduler config: FLUX.1, FLUX.2 klein and Qwen-Image shift dynamically
  by resolution only when sampling, so training is unshifted (1.0); SD3.5 and Z-Image shift
  statically by 3.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lora_pipeline.contracts.families import FAMILIES
from lora_pipeline.contracts.training import ModelFamily


def _preset(rank: int, learning_rate: float, resolution: int, steps: int, shift: float | None = None) -> dict[str, Any]:
    preset = {"rank": rank, "learning_rate": learning_rate, "resolution": resolution, "max_train_steps": steps}
    if shift is not None:
        preset["timestep_shift"] = shift
    return preset


FAMILY_PRESETS: Mapping[ModelFamily, Mapping[str, Any]] = MappingProxyType(
    {
        "sd1": _preset(32, 1e-4, 512, 3000),
        "sd2": _preset(32, 1e-4, 768, 3000),
        "sdxl": _preset(32, 1e-4, 1024, 3000),
        "flux1": _preset(16, 1e-4, 1024, 2000, shift=1.0),
        "flux2-klein": _preset(32, 1e-4, 1024, 3000, shift=1.0),
        "z-image": _preset(32, 1e-4, 1024, 3000, shift=3.0),
        "qwen-image": _preset(16, 1e-4, 1024, 2000, shift=1.0),
        "sd3": _preset(16, 1e-4, 1024, 2000, shift=3.0),
    }
)
# Models built in code (TINY_MODELS): few steps at a tiny size, on top of their family's preset.
TINY_MODEL_PRESET: Mapping[str, Any] = MappingProxyType(
    {"resolution": 32, "max_train_steps": 30, "rank": 4, "learning_rate": 1e-3, "num_sample_images": 2}
)
# Any real base model: four sample images.
BASE_MODEL_PRESET: Mapping[str, Any] = MappingProxyType({"num_sample_images": 4})

if set(FAMILY_PRESETS) != set(FAMILIES):  # a new family needs its preset (and its row in the docs)
    raise AssertionError(f"FAMILY_PRESETS misses {sorted(set(FAMILIES) - set(FAMILY_PRESETS))}")


def preset_for(family: ModelFamily | None, *, tiny: bool) -> dict[str, Any]:
    """The params a run starts from before its own: the family's preset (none when the family is
    unknown at launch: a hub id without ``model_family``), then the tiny or real-model preset."""
    family_preset = FAMILY_PRESETS[family] if family is not None else {}
    return {**family_preset, **(TINY_MODEL_PRESET if tiny else BASE_MODEL_PRESET)}
