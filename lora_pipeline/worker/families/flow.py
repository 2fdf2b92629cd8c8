"""What the flow-matching transformer families share: the timestep density and the target.

diffusers' reference LoRA scripts (``train_dreambooth_lora_{flux,sd3,…}.py``) draw
``u`` from ``compute_density_for_timestep_sampling`` (``weighting_scheme`` "none":
uniform), take ``timesteps = scheduler.timesteps[(u * N).long()]`` of the family's
``FlowMatchEulerDiscreteScheduler`` (its static ``shift`` applied unless it shifts
dynamically by resolution, as FLUX's does), and train ``noise - latents`` at
``(1 - σ) · latents + σ · noise``, σ = t / N. The loss is unweighted (``none``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Family, Loaded
from lora_pipeline.worker.kohya import KohyaNameError

LoraPair = Mapping[str, torch.Tensor]  # {"down": …, "up": …}


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
        """The training timesteps (1000 … 1), kept on ``device``: the scheduler's own (shifted as
        its config says), or shifted by ``timestep_shift`` when the run sets one."""
        if device not in self._timesteps:
            timesteps = loaded.scheduler.timesteps
            if self.timestep_shift is not None:
                timesteps = shifted_timesteps(loaded.scheduler.config.num_train_timesteps, self.timestep_shift)
            self._timesteps[device] = timesteps.to(device=device, dtype=torch.float32)
        return self._timesteps[device]

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = (timesteps / loaded.scheduler.config.num_train_timesteps).to(latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - sigmas) * latents + sigmas * noise, noise - latents

    def prediction_type(self) -> str:
        return "flow"


def shifted_timesteps(num_train_timesteps: int, shift: float) -> torch.Tensor:
    """``num_train_timesteps`` … 1 statically shifted: σ' = s·σ / (1 + (s − 1)·σ) of σ = t / N, as
    ``FlowMatchEulerDiscreteScheduler(shift=s)`` computes them (in float32, in the same order)."""
    import numpy as np

    n = num_train_timesteps
    sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    return shift * sigmas / (1 + (shift - 1) * sigmas) * n


# -- kohya files of transformers whose original modules fuse what diffusers splits ---------


def fused_groups(
    modules: Mapping[str, LoraPair], original_name: Callable[[str], tuple[str, str | None]]
) -> dict[str, dict[str, LoraPair]]:
    """The diffusers ``modules`` grouped by the original (BFL, MMDiT) module each belongs to:
    original name → {part (the diffusers module inside it; the module itself when unfused): pair}."""
    groups: dict[str, dict[str, LoraPair]] = {}
    for module, pair in modules.items():
        original, part = original_name(module)
        groups.setdefault(original, {})[part or module] = pair
    return groups


def fused_kohya_tensors(
    groups: Mapping[str, Mapping[str, LoraPair]],
    alpha: float,
    parts_of: Callable[[str], tuple[str, ...] | None],
    sizes: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """sd-scripts' tensors (``lora_unet_<original path>``) of ``groups``; a fused module's LoRA is
    its parts' (``fuse_lora``), an unfused one's its own."""
    tensors: dict[str, torch.Tensor] = {}
    for original, parts in sorted(groups.items()):
        name = "lora_unet_" + original.replace(".", "_")
        order = parts_of(original)
        if order is None:
            pair = next(iter(parts.values()))
            down, up, scale = pair["down"], pair["up"], 1.0
        else:
            down, up, scale = fuse_lora([parts.get(p) for p in order], [sizes[p] for p in order])
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha) * scale)
    return tensors


def fuse_lora(parts: Sequence[LoraPair | None], sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA on a fused layer from its parts' LoRAs (None: that part is not adapted):
    ``down`` stacked, ``up`` block-diagonal (zero rows for an unadapted part). Returns
    (down, up, alpha factor): the fused rank is the sum of the parts', so alpha grows by the
    same factor to keep every part's alpha/rank."""
    present = [p for p in parts if p is not None]
    rank = present[0]["down"].shape[0]
    down = torch.cat([p["down"] for p in present], dim=0)
    up = torch.zeros(sum(sizes), down.shape[0], dtype=down.dtype)
    row = col = 0
    for pair, size in zip(parts, sizes, strict=True):
        if pair is not None:
            if pair["up"].shape[0] != size:
                raise KohyaNameError(f"a fused part has {pair['up'].shape[0]} outputs, its layer {size}")
            r = pair["down"].shape[0]
            up[row : row + size, col : col + r] = pair["up"]
            col += r
        row += size
    return down, up, down.shape[0] / rank
