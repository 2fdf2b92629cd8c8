"""Which memory levers a training run needs on a GPU of a given size, from arithmetic alone.

A pure function of the base model's size and shape, the training settings and the
card's memory: no torch, so it is tested on its own and its figures can be read in the
docs. It estimates the peak of each combination of levers, cheapest first, and picks the
first that fits; what the request set explicitly is never changed.

The arithmetic (bytes; ``P`` parameters, ``r`` rank, ``T`` tokens per image, ``h`` the
transformer width, ``L`` its blocks, ``b`` the batch):

* **frozen weights**: ``P × bytes(dtype)`` (fp32 4, bf16/fp16 2) for what is not
  quantized; the quantized block linears ``P_q × bytes(kind)``: int8 and float8 1 (+ a
  scale per output row, negligible), NF4 0.5 + 1/16 (an fp32 absmax per 64 weights:
  bitsandbytes' block size; its double quantization makes that less, we do not count on it);
* **the LoRA**: ``r × Σ(in + out)`` parameters over the adapted linears, 16 bytes each: fp32
  weights (4), gradients (4) and AdamW's two moments (8). Only the LoRA has optimizer state;
* **activations** kept for the backward pass, per token per block: about ``24·h`` values
  in the autocast dtype (a block's norm in/out 2h, q/k/v 3h, attention out h, the MLP's
  norm in/out 2h and its 4h hidden twice (before and after the activation) 8h, the
  adaLN modulation products ≈ 4h, rounded up for what we do not list). With
  gradient checkpointing only each block's input is kept (``h``), plus one block's full
  ``24·h`` while it is recomputed. ``b × T × L × …``. Attention itself runs through SDPA
  (flash / memory-efficient): no ``T²`` matrix is stored;
* a UNet's activations are summed per resolution level the same way, its resnets and
  transformer blocks both counted as blocks of the level's width;
* **encoders**: the text encoders and the VAE are on the device only while the cache is
  filled, before the denoiser arrives (``train._train``): their phase is a separate peak,
  unless the text encoders train (then they stay, and count with the denoiser);
* **reserve**: 1.5 GiB for the CUDA context, cuBLAS workspaces and allocator
  fragmentation; a plan fits when its peak is at most ``FRACTION`` of the card.

These are estimates to choose levers by, not measurements: ``benchmarks/gpu/`` measures
the real peak of each lever. Published sizes of the bases we plan for are in
``PUBLISHED`` (each cited there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_pipeline.worker.errors import WorkerInputError

GB = 1e9
GIB = 2**30
RESERVE = int(1.5 * GIB)
FRACTION = 0.92  # of the card's memory a plan may use
ACTIVATION_FACTOR = 24  # values kept per token per block, in units of the width h (see above)
LORA_BYTES = 16  # per LoRA parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
WEIGHT_BYTES = {"no": 4.0, "fp16": 2.0, "bf16": 2.0}
QUANT_BYTES = {"int8": 1.0, "float8": 1.0, "nf4": 0.5 + 1 / 16}
QUANTIZE_ORDER = ("none", "int8", "nf4")  # float8 only when asked for: int8 saves as much, on every GPU


class DoesNotFit(WorkerInputError):
    """No combination of the levers left on auto fits the card."""


@dataclass(frozen=True)
class Level:
    """Tokens at one resolution level of the denoiser, as a fraction of the latent's pixels, with
    the width and number of blocks that run at that level."""

    tokens_per_latent_pixel: float
    width: int
    blocks: int


@dataclass(frozen=True)
class BaseSize:
    """What the planner needs to know about a base model."""

    name: str
    denoiser_params: int
    quantizable_params: int  # the denoiser's parameters in its transformer blocks' linears
    encoder_params: int  # text encoders (loaded in the training dtype)
    vae_params: int  # kept in fp32
    levels: tuple[Level, ...]
    lora_dims: int  # Σ(in + out) over the linears the default targets adapt
    text_tokens: int = 0  # tokens the text adds to each block (joint-attention transformers)


@dataclass(frozen=True)
class Levers:
    """One combination of the memory levers."""

    mixed_precision: str
    quantize_base: str
    gradient_checkpointing: bool

    def describe(self) -> str:
        parts = [
            {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[self.mixed_precision] + " base",
            "" if self.quantize_base == "none" else f"{self.quantize_base} block linears",
            "gradient checkpointing" if self.gradient_checkpointing else "",
        ]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of one combination, by part (bytes)."""

    levers: Levers
    weights: int
    lora: int
    activations: int
    encoders: int  # the cache phase's peak (0 when they stay and count in weights)
    reserve: int

    @property
    def training(self) -> int:
        return self.weights + self.lora + self.activations + self.reserve

    @property
    def peak(self) -> int:
        return max(self.training, self.encoders + self.reserve)

    def describe(self) -> str:
        return (
            f"{self.levers.describe()}: {self.peak / GB:.1f} GB (weights {self.weights / GB:.1f}, "
            f"LoRA+AdamW {self.lora / GB:.2f}, activations {self.activations / GB:.1f}, "
            f"reserve {self.reserve / GB:.1f}; encoders while caching {self.encoders / GB:.1f})"
        )


@dataclass(frozen=True)
class Plan:
    """The levers chosen, their estimated peak, and every combination considered (cheapest first)."""

    chosen: Estimate
    device_bytes: int
    considered: tuple[Estimate, ...] = field(default=())

    @property
    def levers(self) -> Levers:
        return self.chosen.levers

    def why(self) -> str:
        rejected = [e for e in self.considered if e is not self.chosen and e.peak > _usable(self.device_bytes)]
        lines = [f"chose {self.chosen.describe()} on a {self.device_bytes / GB:.1f} GB card"]
        lines += [f"does not fit: {e.describe()}" for e in rejected]
        return "; ".join(lines)


def _usable(device_bytes: int) -> float:
    return device_bytes * FRACTION


def estimate(
    base: BaseSize,
    levers: Levers,
    *,
    resolution: int,
    rank: int,
    batch: int,
    train_text_encoder: bool = False,
    reserve: int = RESERVE,
) -> Estimate:
    """The peak memory of training ``base`` with ``levers`` (see the module's docstring)."""
    dtype_bytes = WEIGHT_BYTES[levers.mixed_precision]
    quantized = base.quantizable_params if levers.quantize_base != "none" else 0
    weights = (base.denoiser_params - quantized) * dtype_bytes + quantized * QUANT_BYTES.get(levers.quantize_base, 0)
    encoders = base.encoder_params * dtype_bytes + base.vae_params * 4
    if train_text_encoder:
        weights += base.encoder_params * dtype_bytes
    latent_pixels = (resolution / 8) ** 2
    kept = 0.0
    largest_block = 0.0
    for level in base.levels:
        tokens = batch * (level.tokens_per_latent_pixel * latent_pixels + base.text_tokens)
        full_block = tokens * level.width * ACTIVATION_FACTOR * dtype_bytes
        largest_block = max(largest_block, full_block)
        kept += level.blocks * (tokens * level.width * dtype_bytes if levers.gradient_checkpointing else full_block)
    activations = kept + (largest_block if levers.gradient_checkpointing else 0)
    return Estimate(
        levers=levers,
        weights=int(weights),
        lora=rank * base.lora_dims * LORA_BYTES,
        activations=int(activations),
        encoders=0 if train_text_encoder else int(encoders),
        reserve=reserve,
    )


def candidates(
    mixed_precision: str, quantize_base: str, gradient_checkpointing: bool | str, *, nf4_available: bool
) -> list[Levers]:
    """Every combination the request allows, cheapest in time first: exact levers (checkpointing)
    before ones that change the numbers (quantization), a smaller quantization last."""
    kinds = [k for k in QUANTIZE_ORDER if k != "nf4" or nf4_available] if quantize_base == "auto" else [quantize_base]
    checkpointing = [False, True] if gradient_checkpointing == "auto" else [bool(gradient_checkpointing)]
    return [Levers(mixed_precision, kind, ckpt) for kind in kinds for ckpt in checkpointing]


def plan_levers(
    base: BaseSize,
    *,
    resolution: int,
    rank: int,
    batch: int,
    device_bytes: int,
    mixed_precision: str = "bf16",
    quantize_base: str = "auto",
    gradient_checkpointing: bool | str = "auto",
    train_text_encoder: bool = False,
    nf4_available: bool = False,
    reserve: int = RESERVE,
) -> Plan:
    """The cheapest combination of levers that fits ``device_bytes``; explicit settings are kept.

    Raises ``DoesNotFit`` naming the smallest estimate and the card's size when none fits.
    """
    if device_bytes <= 0:
        raise ValueError(f"device memory must be positive, got {device_bytes}")
    considered = tuple(
        estimate(
            base,
            levers,
            resolution=resolution,
            rank=rank,
            batch=batch,
            train_text_encoder=train_text_encoder,
            reserve=reserve,
        )
        for levers in candidates(mixed_precision, quantize_base, gradient_checkpointing, nf4_available=nf4_available)
    )
    for option in considered:
        if option.peak <= _usable(device_bytes):
            return Plan(option, device_bytes, considered)
    smallest = min(considered, key=lambda e: e.peak)
    raise DoesNotFit(
        f"{base.name} does not fit: needs {smallest.peak / GB:.1f} GB at best ({smallest.describe()}), "
        f"the card has {device_bytes / GB:.1f} GB (a plan may use {FRACTION:.0%}); lower the resolution "
        f"({resolution}), rank ({rank}) or batch ({batch}), or use a larger GPU"
    )


# -- published sizes --------------------------------------------------------------------------


def transformer_levels(width: int, blocks: int) -> tuple[Level, ...]:
    """A diffusion transformer on 2×2 patches of its /8 latent (FLUX.1, SD3, Qwen-Image …)."""
    return (Level(0.25, width, blocks),)


def unet_levels(
    block_out_channels: Sequence[int], layers_per_block: int, attention: Sequence[bool]
) -> tuple[Level, ...]:
    """A UNet: at level ``i`` (latent /2^i) its resnets (down ``layers_per_block``, up one more)
    and, where it has attention, as many transformer blocks."""
    levels = []
    for i, (width, has_attention) in enumerate(zip(block_out_channels, attention, strict=True)):
        resnets = 2 * layers_per_block + 1
        levels.append(Level(0.25**i, width, resnets * (2 if has_attention else 1)))
    return tuple(levels)


# The denoisers' counts (parameters, those in block linears, Σ(in + out) of to_q/k/v/to_out.0) are
# diffusers 0.42's model classes built from their default configs, which are the published ones,
# on the meta device (``test_memory_plan.py`` counts them again); the rest is cited per entry.
PUBLISHED: dict[str, BaseSize] = {
    # black-forest-labs/FLUX.1-dev model card: "a 12 billion parameter rectified flow transformer";
    # FluxTransformer2DModel(guidance_embeds=True): 19 double + 38 single blocks, 24 heads × 128 = 3072.
    # Text: T5-XXL's encoder (4.76B, google/t5-v1_1-xxl) and CLIP ViT-L/14's text model (123M); VAE 84M.
    "flux1-dev": BaseSize(
        name="FLUX.1-dev",
        denoiser_params=11_901_408_320,
        quantizable_params=11_834_228_736,
        encoder_params=4_760_000_000 + 123_000_000,
        vae_params=84_000_000,
        levels=transformer_levels(3072, 19 + 38),
        lora_dims=1_167_360,
        text_tokens=512,
    ),
    # Qwen/Qwen-Image model card and technical report (arXiv 2508.02324): "a 20B MMDiT";
    # QwenImageTransformer2DModel(): 60 blocks, 24 heads × 128 = 3072 wide.
    # Text: Qwen2.5-VL-7B-Instruct (8.3B with its vision tower); VAE (Wan-2.1's) 127M.
    # Text tokens: the prompt's, up to the pipeline's 1024 (256 counted: captions are short).
    "qwen-image": BaseSize(
        name="Qwen-Image",
        denoiser_params=20_430_401_088,
        quantizable_params=20_384_317_440,
        encoder_params=8_300_000_000,
        vae_params=127_000_000,
        levels=transformer_levels(3072, 60),
        lora_dims=1_474_560,
        text_tokens=256,
    ),
    # stable-diffusion-v1-5 model card: "860M UNet and CLIP ViT-L/14 text encoder" (123M); VAE 84M.
    # UNet2DConditionModel(cross_attention_dim=768): block_out_channels (320, 640, 1280, 1280), 2
    # layers per block, attention in the first three levels; its block linears are 28% of it.
    "sd15": BaseSize(
        name="Stable Diffusion 1.5",
        denoiser_params=859_520_964,
        quantizable_params=242_196_480,
        encoder_params=123_000_000,
        vae_params=84_000_000,
        levels=unet_levels((320, 640, 1280, 1280), 2, (True, True, True, False)),
        lora_dims=199_296,
    ),
}
