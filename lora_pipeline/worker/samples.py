"""A few images generated with the new LoRA, uploaded beside it, so a person can judge it.

Prompts are the dataset's own captions (with the trigger word) and the seeds are
fixed, so samples of two versions of a style can be compared side by side.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_pipeline.contracts.training import ModelFamily, TrainingParams


def sample_prompts(captions: Sequence[str], count: int) -> list[str]:
    """The first ``count`` captions, cycling when the dataset is smaller."""
    if not captions or count <= 0:
        return []
    return [captions[i % len(captions)] for i in range(count)]


def generate_samples(
    model_dir: Path,
    family: ModelFamily,
    lora_file: Path,
    prompts: Sequence[str],
    params: TrainingParams,
    device: torch.device,
) -> list[bytes]:
    """PNG bytes of one image per prompt, generated with the LoRA loaded."""
    if not prompts:
        return []
    from lora_pipeline.worker.families import family_for

    rules = family_for(family, model_dir)
    dtype = (
        torch.bfloat16
        if params.mixed_precision == "bf16"
        else (torch.float16 if params.mixed_precision == "fp16" else torch.float32)
    )
    pipe = rules.sampling_pipeline(dtype)
    pipe.load_lora_weights(str(lora_file))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(params.seed + index)
        image = pipe(
            prompt,
            num_inference_steps=params.sample_inference_steps,
            height=params.resolution,
            width=params.resolution,
            generator=generator,
            **rules.sample_kwargs(),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images
