"""What the flow-matching transformer families share: the timestep density and the target.

diffusers' reference LoRA scripts (``train_dreambooth_lora_{flux,sd3,…}.py``) draw
``u`` from ``compute_density_for_timestep_sampling`` (``weighting_scheme`` "none":
uniform), take ``timesteps = scheduler.timesteps[(u * N).long()]`` of the family's
``FlowMatchEulerDiscreteScheduler`` (its static ``shift`` applied unless it shifts
dynamically by resolution, as FLUX's does), and train ``noise - latents`` at
``(1 - σ) · latents + σ · noise``, σ = t / N. The loss is unweighted (``none``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Family, Loaded


class FlowMatching(Family):
    """A rectified-flow transformer trained as its diffusers reference script trains it."""

    denoiser_component: ClassVar[str] = "transformer"
    peft_names: ClassVar[bool] = True
    weighting_scheme: ClassVar[str] = "none"  # the reference scripts' default density: uniform
    logit_mean: ClassVar[float] = 0.0
    logit_std: ClassVar[float] = 1.0
    mode_scale: ClassVar[float] = 1.29

    def __init__(self, model_dir: Any) -> None:
        super().__init__(model_dir)
        self._timesteps: dict[torch.device, torch.Tensor] = {}

    def draw_timesteps(self, loaded: Loaded, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=n,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )
        schedule = self._schedule(loaded, device)
        indices = (u * loaded.scheduler.config.num_train_timesteps).long().clamp_(0, len(schedule) - 1)
        return schedule[indices]

    def _schedule(self, loaded: Loaded, device: torch.device) -> torch.Tensor:
        """The scheduler's training timesteps (1000 … 1, shifted as it says), kept on ``device``."""
        if device not in self._timesteps:
            self._timesteps[device] = loaded.scheduler.timesteps.to(device=device, dtype=torch.float32)
        return self._timesteps[device]

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = (timesteps / loaded.scheduler.config.num_train_timesteps).to(latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - sigmas) * latents + sigmas * noise, noise - latents

    def prediction_type(self) -> str:
        return "flow"
