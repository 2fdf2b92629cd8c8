"""``TrainingParams.timestep_shift``: the flow families train on σ' = s·σ / (1 + (s − 1)·σ), the
static shift diffusers' FlowMatchEulerDiscreteScheduler applies, and None keeps the base
model's own schedule (the family's reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.families.flow import shifted_timesteps

from .conftest import sample_images


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_the_shift_is_the_schedulers_static_shift_exactly(shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).timesteps
    assert torch.equal(shifted_timesteps(1000, shift), reference)


def test_a_shift_moves_the_drawn_timesteps_and_none_keeps_the_base_models_schedule(tiny_flux1_model: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux1_model, subfolder="scheduler")
    loaded = type("L", (), {"scheduler": scheduler})()

    def mean_draw(shift: float | None) -> float:
        flux = family_for("flux1", tiny_flux1_model)
        flux.timestep_shift = shift
        draws = flux.draw_timesteps(loaded, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))  # type: ignore[arg-type]
        return float(draws.mean())

    # FLUX.1 shifts only when sampling: its training schedule is the unshifted one (shift 1).
    assert mean_draw(None) == mean_draw(1.0)
    assert mean_draw(3.0) > mean_draw(1.0) + 150  # more of the steps at high noise


@pytest.fixture(scope="module")
def examples():
    from lora_pipeline.worker.data import Example, decode_image

    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


def test_training_honours_the_shift(tiny_flux1_model: Path, examples) -> None:
    """The loop hands the run's shift to the family: one step's loss moves with it."""
    from lora_pipeline.worker.train import train_lora

    from .conftest import quick_params

    def loss(shift: float | None) -> float | None:
        params = quick_params(max_train_steps=1, train_batch_size=1, timestep_shift=shift)
        return train_lora(params, "flux1", tiny_flux1_model, examples).final_loss

    assert loss(None) == loss(1.0)
    assert loss(6.0) != loss(1.0)
