"""The real SD 1.5 and SDXL architectures, built in code with random weights (no model hub).

The configs are the published ones (``runwayml/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/config.json``, the CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14 text encoders). Real sizes would need 3.4 GB (SD 1.5) and 13 GB
(SDXL) of fp32 weights and a minute of random initialisation on two cores, so every
parameter is instead a window, at its own seeded offset, into one shared buffer of
random numbers: a full-size model in a few hundred MB, built in about a second, whose
forward pass is the real network's. ``meta=True`` leaves the weights on the ``meta``
device (names and shapes only).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
)
CLIP_L: dict[str, Any] = dict(  # SD 1.5's text encoder and SDXL's first
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
CLIP_G: dict[str, Any] = dict(  # SDXL's second (OpenCLIP ViT-bigG/14)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
SPECS = {"sd1": (SD15_UNET, [CLIP_L]), "sdxl": (SDXL_UNET, [CLIP_L, CLIP_G])}
_POOL = 16_000_000  # ≥ every UNet/encoder layer but the token embeddings (SDXL's ff: 13.1 M)
_OFFSETS = 1_000_003


@dataclass
class Components:
    family: str
    unet: Any
    text_encoders: list[Any]


def build(family: str, *, seed: int = 0, meta: bool = False) -> Components:
    """The UNet and text encoder(s) of ``family`` (``sd1``, ``sdxl``), in fp32."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config, clip_configs = SPECS[family]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_configs[0]))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**clip_configs[1])))
    modules = [unet, *encoders]
    if not meta:
        _fill(modules, seed)
    for module in modules:
        module.eval().requires_grad_(False)
    return Components(family, unet, encoders)


def _fill(modules: list[Any], seed: int) -> None:
    import torch

    pool = torch.randn(_POOL + _OFFSETS, generator=torch.Generator().manual_seed(seed)) * 0.02
    for m_index, module in enumerate(modules):
        for name, owner in module.named_modules():
            for p_name, param in list(owner.named_parameters(recurse=False)):
                offset = zlib.crc32(f"{m_index}:{name}.{p_name}".encode()) % _OFFSETS
                if param.numel() <= _POOL:
                    window = pool[offset : offset + param.numel()].view(param.shape)
                else:  # token embeddings, SD 1.5's widest convs: overlapping rows, each a window
                    rows, width = param.shape[0], param[0].numel()
                    inner = torch.empty(param.shape[1:], device="meta").stride()
                    window = pool.as_strided(param.shape, ((_POOL - width) // rows, *inner), offset)
                if param.dim() == 1:  # norms near 1, biases small; own memory (they are tiny)
                    window = (window + 1.0) if "norm" in name and p_name == "weight" else window.clone()
                setattr(owner, p_name, torch.nn.Parameter(window, requires_grad=False))
