"""kohya sd-scripts module names for the modules of a LoRA trained on a diffusers model.

A kohya-layout LoRA names each adapted module ``<prefix>_<module path with '.' → '_'>``,
where the module path is the one sd-scripts' own model has:

* SD 1.x / 2.x UNet: sd-scripts trains its ``original_unet``, which keeps diffusers'
  names, so ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` becomes
  ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``;
* SDXL UNet: sd-scripts trains Stability's (SGM) UNet, whose blocks are
  ``input_blocks`` / ``middle_block`` / ``output_blocks``, so diffusers'
  ``down_blocks.1.attentions.0`` is ``input_blocks.4.1`` and the name is
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``;
* text encoders: transformers' CLIP paths with their ``text_model.`` level
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), ``lora_te_`` for SD 1/2,
  ``lora_te1_`` / ``lora_te2_`` for SDXL's two.

The SGM block numbering is derived from the UNet's own config (blocks, layers per
block, which blocks attend), as diffusers and ComfyUI derive it for loading, so any
SD-shaped UNet (the real SDXL, the tiny test models) maps. Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# A diffusers ResnetBlock2D's layers under their SGM (ResBlock) names.
_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the block structure.
_TOP_LEVEL_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TEXT_PREFIXES = {
    ("sd1", "text_encoder"): "lora_te",
    ("sd2", "text_encoder"): "lora_te",
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
    ("flux1", "text_encoder"): "lora_te1",  # sd-scripts' FLUX.1: CLIP-L is te1 (T5, te3, is not trained here)
    ("sd3", "text_encoder"): "lora_te1",  # sd-scripts' SD3: CLIP-L, CLIP-G (T5, te3, is not trained here)
    ("sd3", "text_encoder_2"): "lora_te2",
}


class KohyaNameError(ValueError):
    """A module that has no name in the kohya layout; the message names it."""


def kohya_module_name(component: str, module: str, family: str, unet_config: Mapping[str, Any] | None) -> str:
    """The kohya name of ``module`` (a path inside ``component``: ``unet``, ``text_encoder``,
    ``text_encoder_2``) of a LoRA for ``family`` (``sd1``, ``sd2``, ``sdxl``)."""
    if component == "unet":
        if family == "sdxl":
            if unet_config is None:
                raise KohyaNameError("an SDXL UNet module needs the UNet config to be named")
            module = unet_sgm_path(module, unet_config)
        return "lora_unet_" + module.replace(".", "_")
    prefix = _TEXT_PREFIXES.get((family, component))
    if prefix is None:
        raise KohyaNameError(f"{component!r} has no kohya prefix for a {family} LoRA")
    # transformers 5's CLIPTextModel has no ``text_model`` level; sd-scripts' names do.
    module = module if module.startswith("text_model.") else "text_model." + module
    return f"{prefix}_{module.replace('.', '_')}"


def check_unet_config(config: Mapping[str, Any]) -> None:
    """KohyaNameError now, before training, if this UNet's blocks cannot be given SGM names."""
    _Blocks(config)


def unet_sgm_path(path: str, config: Mapping[str, Any]) -> str:
    """The SGM (Stability ``generative-models``) path of a diffusers UNet module ``path``."""
    if path in _TOP_LEVEL_SGM:
        return _TOP_LEVEL_SGM[path]
    blocks = _Blocks(config)
    parts = path.split(".")
    kind = parts[0]
    try:
        if kind == "down_blocks":
            i, what, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if what == "downsamplers" and j == 0 and rest == ["conv"]:
                return f"input_blocks.{blocks.downsampler_index(i)}.0.op"
            if what in ("resnets", "attentions"):
                index = blocks.input_index(i, j)
                return f"input_blocks.{index}." + _inner(what, rest)
        elif kind == "mid_block":
            what, j, rest = parts[1], int(parts[2]), parts[3:]
            if what in ("resnets", "attentions"):  # middle_block.N is the layer itself, not a list
                return f"middle_block.{blocks.middle_index(what, j)}." + _inner(what, rest).split(".", 1)[1]
        elif kind == "up_blocks":
            i, what, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if what == "upsamplers" and j == 0 and rest == ["conv"]:
                index, position = blocks.upsampler_position(i)
                return f"output_blocks.{index}.{position}.conv"
            if what in ("resnets", "attentions"):
                return f"output_blocks.{blocks.output_index(i, j)}." + _inner(what, rest)
    except (IndexError, ValueError):
        pass
    raise KohyaNameError(f"UNet module {path!r} has no SGM (sd-scripts SDXL) name")


def _inner(what: str, rest: Sequence[str]) -> str:
    """The path inside a block: ``0.<resnet layer>`` or ``1.<attention path>``."""
    if not rest:
        raise KohyaNameError("a block itself is not a LoRA module")
    if what == "attentions":
        return "1." + ".".join(rest)
    if rest[0] not in _RESNET_SGM:
        raise KohyaNameError(f"resnet layer {rest[0]!r} has no SGM name")
    return "0." + ".".join([_RESNET_SGM[rest[0]], *rest[1:]])


class _Blocks:
    """Where each diffusers block lands in SGM's flat ``input_blocks``/``output_blocks`` lists:
    every down block contributes its layers then (unless last) a downsampler; every up
    block one more layer than its down block, the last of them carrying the upsampler."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        down = list(config.get("down_block_types") or ())
        up = list(config.get("up_block_types") or ())
        if not down or len(down) != len(up):
            raise KohyaNameError("the UNet config must list as many down blocks as up blocks")
        per_block = config.get("layers_per_block", 2)
        layers = [int(per_block)] * len(down) if isinstance(per_block, int) else [int(n) for n in per_block]
        if len(layers) != len(down):
            raise KohyaNameError("layers_per_block must give one count per down block")
        self.layers = layers
        self.up_attends = ["CrossAttn" in t for t in up]
        self.mid_attends = (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
        self.n = len(down)

    def input_index(self, block: int, layer: int) -> int:
        if not (0 <= block < self.n and 0 <= layer < self.layers[block]):
            raise KohyaNameError(f"down_blocks.{block} has no layer {layer}")
        return 1 + sum(n + 1 for n in self.layers[:block]) + layer

    def downsampler_index(self, block: int) -> int:
        if not 0 <= block < self.n - 1:
            raise KohyaNameError(f"down_blocks.{block} has no downsampler")
        return 1 + sum(n + 1 for n in self.layers[:block]) + self.layers[block]

    def middle_index(self, what: str, layer: int) -> int:
        order = ["resnets.0", "attentions.0", "resnets.1"] if self.mid_attends else ["resnets.0", "resnets.1"]
        name = f"{what}.{layer}"
        if name not in order:
            raise KohyaNameError(f"mid_block has no {name}")
        return order.index(name)

    def _up_layers(self) -> list[int]:
        return [n + 1 for n in reversed(self.layers)]

    def output_index(self, block: int, layer: int) -> int:
        counts = self._up_layers()
        if not (0 <= block < self.n and 0 <= layer < counts[block]):
            raise KohyaNameError(f"up_blocks.{block} has no layer {layer}")
        return sum(counts[:block]) + layer

    def upsampler_position(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.n - 1:
            raise KohyaNameError(f"up_blocks.{block} has no upsampler")
        counts = self._up_layers()
        return sum(counts[: block + 1]) - 1, 2 if self.up_attends[block] else 1
