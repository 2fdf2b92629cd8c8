"""ComfyUI's rules for which LoRA keys it loads into an SD 1.x / SDXL model, as a test oracle.

Written from reading ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``,
``model_lora_keys_clip``, ``load_lora``) and ``comfy/utils.py`` (``unet_to_diffusers``),
independently of the pipeline's own kohya naming (worker/kohya.py), so the two can
disagree. ComfyUI's model is Stability's (SGM) UNet; its key map holds, for every
weight of that UNet, ``lora_unet_<SGM path>`` and ``lora_unet_<diffusers path>``
(with '.' → '_'), and for every CLIP encoder layer the kohya text-encoder names
(``lora_te_``/``lora_te1_`` for CLIP-L and CLIP-H, ``lora_te2_`` for CLIP-G beside CLIP-L).
A LoRA module loads when ``<name>.lora_up.weight`` and ``<name>.lora_down.weight`` are
present; ``<name>.alpha`` is read beside them; any other key is "not loaded".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The resnet and transformer-block weights ComfyUI maps (utils.UNET_MAP_RESNET, TRANSFORMER_BLOCKS,
# UNET_MAP_ATTENTIONS), diffusers name → SGM name.
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
ATTENTION = ["proj_in", "proj_out", "norm"]
TRANSFORMER_BLOCK = [
    "norm1",
    "norm2",
    "norm3",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
]
BASIC = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
CLIP_LAYERS = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


@dataclass(frozen=True)
class ComfyUnetConfig:
    """The fields of ComfyUI's ``unet_config`` its diffusers map reads."""

    num_res_blocks: Sequence[int]
    transformer_depth: Sequence[int]  # per input-block layer, highest resolution first
    transformer_depth_output: Sequence[int]  # per output-block layer, listed highest resolution first
    transformer_depth_middle: int


# ComfyUI's values for the two models (what its model detection finds in their checkpoints).
SD15 = ComfyUnetConfig([2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 1)
SDXL = ComfyUnetConfig([2, 2, 2], [0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10)


def comfy_config_of(diffusers_config: Mapping[str, Any]) -> ComfyUnetConfig:
    """ComfyUI's view of a diffusers UNet config (for the tiny test models)."""
    downs = list(diffusers_config["down_block_types"])
    per = diffusers_config.get("layers_per_block", 2)
    depth = diffusers_config.get("transformer_layers_per_block", 1)
    depths = [depth] * len(downs) if isinstance(depth, int) else list(depth)
    res = [per] * len(downs)
    attn = [d if "CrossAttn" in t else 0 for d, t in zip(depths, downs, strict=True)]
    return ComfyUnetConfig(
        res,
        [a for a, n in zip(attn, res, strict=True) for _ in range(n)],
        [a for a, n in zip(attn, res, strict=True) for _ in range(n + 1)],
        depths[-1],
    )


def unet_to_sgm(config: ComfyUnetConfig) -> dict[str, str]:
    """diffusers weight key → SGM weight key for every weight ComfyUI maps."""
    out: dict[str, str] = {}

    def resnet(prefix: str, target: str) -> None:
        for d, s in RESNET.items():
            for w in ("weight", "bias"):
                out[f"{prefix}.{d}.{w}"] = f"{target}.{s}.{w}"

    def attention(prefix: str, target: str, depth: int) -> None:
        for name in ATTENTION:
            for w in ("weight", "bias"):
                out[f"{prefix}.{name}.{w}"] = f"{target}.{name}.{w}"
        for t in range(depth):
            for name in TRANSFORMER_BLOCK:
                for w in ("weight", "bias"):
                    out[f"{prefix}.transformer_blocks.{t}.{name}.{w}"] = f"{target}.transformer_blocks.{t}.{name}.{w}"

    depths = list(config.transformer_depth)
    blocks = len(config.num_res_blocks)
    for x in range(blocks):
        n = 1 + (config.num_res_blocks[x] + 1) * x
        for i in range(config.num_res_blocks[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            depth = depths.pop(0)
            if depth > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth)
            n += 1
        for w in ("weight", "bias"):
            out[f"down_blocks.{x}.downsamplers.0.conv.{w}"] = f"input_blocks.{n}.0.op.{w}"
    attention("mid_block.attentions.0", "middle_block.1", config.transformer_depth_middle)
    for i, n in enumerate([0, 2]):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    outputs = list(config.transformer_depth_output)
    reversed_res = list(reversed(config.num_res_blocks))
    for x in range(blocks):
        n = (reversed_res[x] + 1) * x
        layers = reversed_res[x] + 1
        for i in range(layers):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            position = 1
            depth = outputs.pop()
            if depth > 0:
                position += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if i == layers - 1:
                for w in ("weight", "bias"):
                    out[f"up_blocks.{x}.upsamplers.0.conv.{w}"] = f"output_blocks.{n}.{position}.conv.{w}"
            n += 1
    for d, s in BASIC.items():
        for w in ("weight", "bias"):
            out[f"{d}.{w}"] = f"{s}.{w}"
    return out


def lora_key_map(config: ComfyUnetConfig, clip: Mapping[str, int]) -> dict[str, str]:
    """LoRA module name → the model weight ComfyUI patches with it.

    ``clip``: the model's text encoders and their layer counts, e.g. ``{"clip_l": 12}`` for
    SD 1.x, ``{"clip_l": 12, "clip_g": 32}`` for SDXL, ``{"clip_h": 23}`` for SD 2.x.
    UNet targets are ``diffusion_model.<SGM key>``; CLIP ones ``<clip>.transformer.text_model…``.
    """
    key_map: dict[str, str] = {}
    sgm = unet_to_sgm(config)
    for s in sgm.values():
        if s.endswith(".weight"):
            key_map["lora_unet_" + s[: -len(".weight")].replace(".", "_")] = "diffusion_model." + s
    for d, s in sgm.items():
        if d.endswith(".weight"):
            key_map["lora_unet_" + d[: -len(".weight")].replace(".", "_")] = "diffusion_model." + s
    key_map.update(clip_key_map(clip))
    return key_map


def clip_key_map(clip: Mapping[str, int]) -> dict[str, str]:
    """The kohya text-encoder names ComfyUI maps (``model_lora_keys_clip``) for ``clip``."""
    key_map: dict[str, str] = {}
    for b in range(max(clip.values(), default=0)):
        for layer, kohya in CLIP_LAYERS.items():
            for name, layers in clip.items():
                if b >= layers:
                    continue
                target = f"{name}.transformer.text_model.encoder.layers.{b}.{layer}.weight"
                if name in ("clip_l", "clip_h"):
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = target
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = target
                elif name == "clip_g" and "clip_l" in clip:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = target
    return key_map


# -- FLUX.1 -------------------------------------------------------------------------------
# comfy/utils.py ``flux_to_diffusers`` (v0.19.3): diffusers transformer weight → ComfyUI's (BFL)
# weight, or (BFL weight, offset, rows) for a part of a fused one. ComfyUI's key map then
# holds ``lora_unet_<BFL path>`` for every weight of its model (``model_lora_keys_unet``).
FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
FLUX_BASIC = {
    "proj_out": "final_layer.linear",
    "x_embedder": "img_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "context_embedder": "txt_in",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def flux_to_bfl(depth: int, depth_single: int, hidden: int) -> dict[str, str | tuple[str, int, int]]:
    """diffusers ``<module>.weight`` → BFL ``<module>.weight`` or (that, row offset, rows)."""
    out: dict[str, str | tuple[str, int, int]] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.img_attn.qkv.weight", hidden * j, hidden)
        for j, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.txt_attn.qkv.weight", hidden * j, hidden)
        for a, b in FLUX_DOUBLE.items():
            out[f"{src}.{a}.weight"] = f"{dst}.{b}.weight"
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.linear1.weight", hidden * j, hidden)
        out[f"{src}.proj_mlp.weight"] = (f"{dst}.linear1.weight", hidden * 3, hidden * 4)
        for a, b in FLUX_SINGLE.items():
            out[f"{src}.{a}.weight"] = f"{dst}.{b}.weight"
    for a, b in FLUX_BASIC.items():
        out[f"{a}.weight"] = f"{b}.weight"
    return out


# -- FLUX.2 -------------------------------------------------------------------------------
# The same ``flux_to_diffusers`` for a FLUX.2 model (model_base.Flux2 is a Flux; its model is
# comfy/ldm/flux/model.py with ``global_modulation`` and ``mlp_silu_act``): the block-map entries
# FLUX.2's diffusers names hit ("LyCoris LoKr" feed-forwards, "# Flux 2" single blocks). It has no
# entry for ``time_guidance_embed``, ``double_stream_modulation_*`` or ``single_stream_modulation``,
# and ``norm_out.linear`` only with shift and scale swapped (left out, as for SD3).
FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"}


def flux2_to_bfl(depth: int, depth_single: int, hidden: int) -> dict[str, str | tuple[str, int, int]]:
    """diffusers FLUX.2 ``<module>.weight`` → ComfyUI's ``<module>.weight`` or (that, row offset, rows)."""
    out: dict[str, str | tuple[str, int, int]] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.img_attn.qkv.weight", hidden * j, hidden)
        for j, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.txt_attn.qkv.weight", hidden * j, hidden)
        for a, b in FLUX2_DOUBLE.items():
            out[f"{src}.{a}.weight"] = f"{dst}.{b}.weight"
    for i in range(depth_single):
        for a, b in FLUX2_SINGLE.items():
            out[f"single_transformer_blocks.{i}.{a}.weight"] = f"single_blocks.{i}.{b}.weight"
    for a, b in FLUX2_BASIC.items():
        out[f"{a}.weight"] = f"{b}.weight"
    return out


def to_bfl(weights: Mapping[str, Any], mapping: Mapping[str, str | tuple[str, int, int]]) -> dict[str, Any]:
    """A diffusers transformer's weights as ComfyUI's model (BFL's FLUX.1, SD3's MMDiT) holds them."""
    import torch

    parts: dict[str, list[tuple[int, Any]]] = {}
    out: dict[str, Any] = {}
    for key, target in mapping.items():
        if key not in weights:
            continue
        if isinstance(target, tuple):
            parts.setdefault(target[0], []).append((target[1], weights[key]))
        else:
            out[target] = weights[key]
    for target, pieces in parts.items():
        out[target] = torch.cat([w for _, w in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out


@dataclass(frozen=True)
class Patch:
    target: str  # the model weight
    up: Any
    down: Any
    alpha: float | None


def load_lora(lora: Mapping[str, Any], key_map: Mapping[str, str]) -> tuple[dict[str, Patch], list[str]]:
    """(weight → patch, keys not loaded), as ComfyUI's ``load_lora`` decides for kohya LoRAs."""
    patches: dict[str, Patch] = {}
    loaded: set[str] = set()
    for name, target in key_map.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up not in lora:
            continue
        value = float(lora[alpha].item()) if alpha in lora else None
        loaded.update(k for k in (up, down, alpha) if k in lora)
        patches[target] = Patch(target, lora[up], lora[down], value)
    return patches, sorted(k for k in lora if k not in loaded)


# -- SD3 ----------------------------------------------------------------------------------
# comfy/utils.py ``mmdit_to_diffusers`` (MMDIT_MAP_BLOCK, MMDIT_MAP_BASIC): the fused q/k/v are
# ``depth × 64`` rows each; the last block's context modulation is swapped (not listed here).
MMDIT_BLOCK = {
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
}
MMDIT_BASIC = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}


def mmdit_to_mmdit(depth: int) -> dict[str, str | tuple[str, int, int]]:
    """diffusers ``<module>.weight`` → MMDiT ``<module>.weight`` or (that, row offset, rows)."""
    out: dict[str, str | tuple[str, int, int]] = {}
    offset = depth * 64
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.x_block.attn.qkv.weight", offset * j, offset)
        for j, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{src}.attn.{part}.weight"] = (f"{dst}.context_block.attn.qkv.weight", offset * j, offset)
        for a, b in MMDIT_BLOCK.items():
            if not (i == depth - 1 and a == "norm1_context.linear"):
                out[f"{src}.{a}.weight"] = f"{dst}.{b}.weight"
    for a, b in MMDIT_BASIC.items():
        out[f"{a}.weight"] = f"{b}.weight"
    return out


# -- Z-Image ------------------------------------------------------------------------------
# ComfyUI loads Z-Image as a Lumina 2 model (NextDiT); comfy/utils.py ``z_image_to_diffusers``
# (v0.19.3) maps diffusers' Z-Image weights onto it: to_q/to_k/to_v are rows 0, dim, 2·dim of
# ``attention.qkv`` (``(qkv, (0, offset, dim))``), the rest one to one. Its LoRA key map holds
# ``lora_unet_<NextDiT path>`` for every weight of that model, as for every model.
Z_IMAGE_BLOCK = {
    "attention.norm_q.weight": "attention.q_norm.weight",
    "attention.norm_k.weight": "attention.k_norm.weight",
    "attention.to_out.0.weight": "attention.out.weight",
    "attention.to_out.0.bias": "attention.out.bias",
    "attention_norm1.weight": "attention_norm1.weight",
    "attention_norm2.weight": "attention_norm2.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight",  # has_adaln (context_refiner has none)
    "adaLN_modulation.0.bias": "adaLN_modulation.0.bias",
}
Z_IMAGE_BASIC = {
    "all_final_layer.2-1.linear.weight": "final_layer.linear.weight",
    "all_final_layer.2-1.linear.bias": "final_layer.linear.bias",
    "all_final_layer.2-1.adaLN_modulation.1.weight": "final_layer.adaLN_modulation.1.weight",
    "all_final_layer.2-1.adaLN_modulation.1.bias": "final_layer.adaLN_modulation.1.bias",
    "all_x_embedder.2-1.weight": "x_embedder.weight",
    "all_x_embedder.2-1.bias": "x_embedder.bias",
    "x_pad_token": "x_pad_token",
    "cap_embedder.0.weight": "cap_embedder.0.weight",
    "cap_embedder.1.weight": "cap_embedder.1.weight",
    "cap_embedder.1.bias": "cap_embedder.1.bias",
    "cap_pad_token": "cap_pad_token",
    "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
}


def z_image_to_nextdit(n_layers: int, n_refiner_layers: int, dim: int) -> dict[str, str | tuple[str, int, int]]:
    """diffusers Z-Image weight → NextDiT weight, or (that, row offset, rows) inside ``attention.qkv``."""
    out: dict[str, str | tuple[str, int, int]] = {}
    blocks = [f"layers.{i}" for i in range(n_layers)]
    blocks += [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(n_refiner_layers)]
    for block in blocks:
        for end in ("weight", "bias"):
            for j, part in enumerate(("to_q", "to_k", "to_v")):
                out[f"{block}.attention.{part}.{end}"] = (f"{block}.attention.qkv.{end}", dim * j, dim)
        for a, b in Z_IMAGE_BLOCK.items():
            out[f"{block}.{a}"] = f"{block}.{b}"
    out.update(Z_IMAGE_BASIC)
    return out


def apply_kohya_lora(
    lora: Mapping[str, Any], model: Mapping[str, Any], clip: Mapping[str, int]
) -> tuple[dict[str, Any], list[str]]:
    """ComfyUI's model weights (``model``: its diffusion model's, without ``diffusion_model.``)
    patched with a kohya ``lora`` as ComfyUI does (every ``lora_unet_<path>`` of its model,
    the kohya CLIP names; ``weight += alpha/rank · up @ down``), and the keys it did not load."""
    key_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): "diffusion_model." + k for k in model}
    key_map.update(clip_key_map(clip))
    patches, not_loaded = load_lora(lora, key_map)
    return apply_patches(model, patches), not_loaded


def apply_patches(model: Mapping[str, Any], patches: Mapping[str, Patch]) -> dict[str, Any]:
    """``model`` (without ``diffusion_model.``) with each diffusion-model patch added as ComfyUI
    adds a LoRA: ``weight += alpha/rank · up @ down`` (alpha = rank when the file has none)."""
    patched = dict(model)
    for target, patch in patches.items():
        if target.startswith("diffusion_model."):
            key = target[len("diffusion_model.") :]
            rank = patch.down.shape[0]
            alpha = patch.alpha if patch.alpha is not None else rank
            patched[key] = patched[key] + (alpha / rank) * patch.up.float() @ patch.down.float()
    return patched


def with_lora(weights: Mapping[str, Any], layers: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """diffusers ``weights`` with peft-named LoRA ``layers`` (``<module>.lora_A/B.weight``) merged at ``scale``."""
    out = dict(weights)
    for key, down in layers.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            out[name + ".weight"] = out[name + ".weight"] + scale * layers[name + ".lora_B.weight"] @ down
    return out


# -- Qwen-Image ---------------------------------------------------------------------------
# comfy/ldm/qwen_image/model.py (v0.19.3): the weights of ComfyUI's QwenImage model (its LayerNorms
# have no affine weights). comfy/lora.py ``model_lora_keys_unet`` maps each ``diffusion_model.<k>.weight``
# as ``lora_unet_<k with _>`` (every model) and, for QwenImage ("QwenImage lora format"), as
# ``<k>``, ``transformer.<k>`` and ``lycoris_<k with _>``; also ``diffusion_model.<k>`` (generic).
QWEN_IMAGE_BLOCK = [
    "img_mod.1",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mod.1",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "attn.norm_q",
    "attn.norm_k",
    "attn.norm_added_q",
    "attn.norm_added_k",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
]
QWEN_IMAGE_TOP = [
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "txt_norm",
    "img_in",
    "txt_in",
    "norm_out.linear",
    "proj_out",
]


def qwen_image_weights(depth: int) -> list[str]:
    """The ``.weight`` keys of ComfyUI's QwenImage model with ``depth`` transformer blocks."""
    blocks = [f"transformer_blocks.{i}.{m}.weight" for i in range(depth) for m in QWEN_IMAGE_BLOCK]
    return blocks + [f"{m}.weight" for m in QWEN_IMAGE_TOP]


def qwen_image_key_map(weights: Sequence[str]) -> dict[str, str]:
    """LoRA module name → ``diffusion_model.<weight>`` for a QwenImage model's ``weights``."""
    key_map: dict[str, str] = {}
    for weight in weights:
        module, target = weight[: -len(".weight")], "diffusion_model." + weight
        for name in ("lora_unet_" + module.replace(".", "_"), "diffusion_model." + module, module):
            key_map[name] = target
        key_map["transformer." + module] = target
        key_map["lycoris_" + module.replace(".", "_")] = target
    return key_map
