"""The memory planner: which levers a base needs on a card, from the documented arithmetic.

The published cases the issue names (FLUX.1-dev at 1024² rank 16 on 24 GB, Qwen-Image on
48 GB, SD1.5 on 8 GB), a card too small, explicit settings kept, and the planner wired
into training (on the CPU, with a device memory given).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.memory_plan import (
    FRACTION,
    GB,
    LORA_BYTES,
    PUBLISHED,
    QUANT_BYTES,
    DoesNotFit,
    Levers,
    estimate,
    plan_levers,
)
from lora_pipeline.worker.quantize import big_linears
from lora_pipeline.worker.train import measure_base, prepare_cache, train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

FLUX = PUBLISHED["flux1-dev"]
QWEN = PUBLISHED["qwen-image"]
SD15 = PUBLISHED["sd15"]


def _plan(base, gb: float, resolution: int = 1024, **kwargs):
    return plan_levers(base, resolution=resolution, rank=16, batch=1, device_bytes=int(gb * GB), **kwargs)


def test_flux1_dev_at_1024_rank_16_fits_a_24_gb_card_with_an_int8_base_and_checkpointing() -> None:
    plan = _plan(FLUX, 24)
    assert plan.levers == Levers("bf16", "int8", True)
    assert plan.chosen.peak <= 24 * GB * FRACTION
    # Cheaper plans were considered and do not fit: the bf16 weights alone are most of the card.
    bf16 = next(e for e in plan.considered if e.levers == Levers("bf16", "none", True))
    assert bf16.weights > 22 * GB and bf16.peak > 24 * GB * FRACTION
    assert "int8 block linears, gradient checkpointing" in plan.why() and "does not fit: bf16 base" in plan.why()


def test_qwen_image_fits_a_48_gb_card_without_nf4() -> None:
    plan = _plan(QWEN, 48, nf4_available=True)
    assert plan.levers == Levers("bf16", "int8", True)


def test_sd15_at_512_needs_no_lever_on_an_8_gb_card() -> None:
    plan = _plan(SD15, 8, resolution=512)
    assert plan.levers == Levers("bf16", "none", False)
    assert plan.considered[0] is plan.chosen  # the first, cheapest, combination


def test_a_card_too_small_is_refused_with_what_is_needed_and_what_it_has() -> None:
    with pytest.raises(DoesNotFit) as refused:
        _plan(QWEN, 16)
    smallest = min(
        estimate(QWEN, Levers("bf16", kind, ckpt), resolution=1024, rank=16, batch=1).peak
        for kind in ("none", "int8")
        for ckpt in (False, True)
    )
    message = str(refused.value)
    assert f"needs {smallest / GB:.1f} GB" in message and "the card has 16.0 GB" in message
    assert "Qwen-Image does not fit" in message


def test_nf4_is_the_last_resort_and_only_where_bitsandbytes_is() -> None:
    assert _plan(FLUX, 16, nf4_available=True).levers == Levers("bf16", "nf4", True)
    with pytest.raises(DoesNotFit):
        _plan(FLUX, 16, nf4_available=False)


def test_explicit_settings_are_kept_and_only_auto_ones_are_planned() -> None:
    assert _plan(FLUX, 24, quantize_base="float8").levers == Levers("bf16", "float8", True)
    assert _plan(FLUX, 80, gradient_checkpointing=True).levers == Levers("bf16", "none", True)
    with pytest.raises(DoesNotFit):  # no quantization asked for: checkpointing alone is not enough
        _plan(FLUX, 24, quantize_base="none")


def test_the_estimate_is_the_documented_arithmetic() -> None:
    plain = estimate(FLUX, Levers("bf16", "none", False), resolution=1024, rank=16, batch=1)
    int8 = estimate(FLUX, Levers("bf16", "int8", False), resolution=1024, rank=16, batch=1)
    checkpointed = estimate(FLUX, Levers("bf16", "none", True), resolution=1024, rank=16, batch=1)
    doubled = estimate(FLUX, Levers("bf16", "none", False), resolution=1024, rank=16, batch=2)
    assert plain.weights == FLUX.denoiser_params * 2
    assert int8.weights == int((FLUX.denoiser_params - FLUX.quantizable_params) * 2 + FLUX.quantizable_params)
    assert plain.lora == 16 * FLUX.lora_dims * LORA_BYTES
    assert doubled.activations == pytest.approx(2 * plain.activations, rel=1e-6)
    # Checkpointing keeps each block's input (1 of 24 values) and one block's full set.
    assert checkpointed.activations == pytest.approx(plain.activations * (1 / 24 + 1 / FLUX.levels[0].blocks), rel=1e-6)
    assert plain.encoders == FLUX.encoder_params * 2 + FLUX.vae_params * 4
    nf4 = estimate(FLUX, Levers("bf16", "nf4", False), resolution=1024, rank=16, batch=1)
    assert nf4.weights < int8.weights < plain.weights and QUANT_BYTES["nf4"] > 0.5


# -- wired into training ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


AUTO = dict(
    quantize_base="auto", gradient_checkpointing="auto", max_train_steps=2, target_modules=["to_q", "to_k", "to_v"]
)


def test_measure_base_counts_the_loaded_model_as_the_planner_needs(tiny_flux1_model: Path, examples) -> None:
    params = quick_params(**AUTO)
    rules = family_for("flux1", tiny_flux1_model)
    models = rules.load(torch.device("cpu"), torch.float32)
    cache = prepare_cache(rules, models, examples[:1], params, torch.device("cpu"), torch.float32)
    size = measure_base(models, cache, params)
    transformer = models.denoiser
    assert size.denoiser_params == sum(p.numel() for p in transformer.parameters())
    assert size.quantizable_params == sum(m.weight.numel() for _, m in big_linears(transformer))
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert size.levels[0].blocks == blocks and size.levels[0].width == transformer.config.num_attention_heads * (
        transformer.config.attention_head_dim
    )
    assert size.text_tokens == cache.conditioning[0]["encoder_hidden_states"].shape[0]
    adapted = [m for n, m in transformer.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    assert size.lora_dims == sum(m.in_features + m.out_features for m in adapted)


def test_training_with_auto_levers_follows_the_plan_for_the_memory_given(tiny_flux1_model: Path, examples) -> None:
    params = quick_params(**AUTO)
    rules = family_for("flux1", tiny_flux1_model)
    models = rules.load(torch.device("cpu"), torch.float32)
    cache = prepare_cache(rules, models, examples, params, torch.device("cpu"), torch.float32)
    size = measure_base(models, cache, params)
    roomy = plan_levers(size, resolution=32, rank=4, batch=2, device_bytes=10**12, mixed_precision="no")
    wanted = next(e for e in roomy.considered if e.levers == Levers("no", "int8", True))
    others = [
        e.peak for e in roomy.considered if e.levers.quantize_base == "none" or not e.levers.gradient_checkpointing
    ]
    assert wanted.peak < min(others)  # so a card between them needs exactly int8 + checkpointing
    card = int((wanted.peak + min(others)) / 2 / FRACTION)

    outcome = train_lora(params, "flux1", tiny_flux1_model, examples, device_memory=card)
    assert (outcome.quantize_base, outcome.gradient_checkpointing) == ("int8", True)
    assert outcome.quantized_linears > 0 and "int8 block linears, gradient checkpointing" in outcome.memory_plan
    assert all(torch.isfinite(torch.tensor(outcome.losses)))

    on_cpu = train_lora(params, "flux1", tiny_flux1_model, examples)  # no memory to plan for: levers off
    assert (on_cpu.quantize_base, on_cpu.gradient_checkpointing) == ("none", False)
    with pytest.raises(DoesNotFit, match="does not fit"):
        train_lora(params, "flux1", tiny_flux1_model, examples, device_memory=int(wanted.peak / 2))


@pytest.mark.parametrize(
    ("key", "build"),
    [
        ("flux1-dev", lambda d: d.FluxTransformer2DModel(guidance_embeds=True)),
        ("qwen-image", lambda d: d.QwenImageTransformer2DModel()),
        ("sd15", lambda d: d.UNet2DConditionModel(cross_attention_dim=768)),
    ],
)
def test_the_published_denoiser_counts_are_diffusers_default_configs(key, build) -> None:
    """The planner's published figures, counted again from the model classes (on the meta device:
    no memory, no weights) as the worker counts a loaded base."""
    import diffusers

    with torch.device("meta"):
        model = build(diffusers)
    published = PUBLISHED[key]
    assert published.denoiser_params == sum(p.numel() for p in model.parameters())
    assert published.quantizable_params == sum(m.weight.numel() for _, m in big_linears(model))
    adapted = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith(".to_out.0"))
    ]
    assert published.lora_dims == sum(m.in_features + m.out_features for m in adapted)
