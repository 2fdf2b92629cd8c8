"""The memory levers for large bases, each on its own, on the tiny models and the CPU.

Each test shows the lever is wired: it changes what is loaded, kept or computed as it
says (a quantized weight, checkpointed blocks, encoders gone from the device), and
training still works. How much memory each saves at real size is a GPU measurement
(benchmarks/gpu/), and the planner's arithmetic is ``test_memory_plan.py``'s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.quantize import big_linears, check_quantization_available, is_quantized, quantize_denoiser
from lora_pipeline.worker.train import train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images, train_and_write

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "ff.net.2"]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


def _flux_params(**overrides):
    return quick_params(**{"target_modules": FLUX_TARGETS, "max_train_steps": 3, **overrides})


@pytest.fixture(scope="module")
def unquantized(tiny_flux1_model: Path, examples: list[Example]):
    return train_lora(_flux_params(), "flux1", tiny_flux1_model, examples)


# -- quantize_base ------------------------------------------------------------------------


def _transformer(model: Path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_quantize_base_stores_the_block_linears_quantized_and_nothing_else(tiny_flux1_model: Path, kind) -> None:
    transformer = _transformer(tiny_flux1_model)
    blocks = dict(big_linears(transformer))
    assert blocks and all(
        ".transformer_blocks." in n or n.startswith(("transformer_blocks", "single_")) for n in blocks
    )
    before = sum(p.numel() * p.element_size() for p in transformer.parameters())
    count = quantize_denoiser(transformer, kind, torch.device("cpu"))
    assert count == len(blocks)
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, m in linears.items() if is_quantized(m)} == set(blocks)
    assert not is_quantized(linears["x_embedder"]) and not is_quantized(linears["proj_out"])  # kept precise
    # One byte per quantized weight instead of four (the tiny model is fp32), plus small scales.
    after = sum(_bytes(p) for p in transformer.parameters())
    quantized_weights = sum(m.weight.numel() for m in blocks.values())
    assert after < before - 2.5 * quantized_weights


@pytest.mark.parametrize(
    "kind",
    ["int8", "float8", pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed"))],
)
def test_peft_wraps_each_quantized_linear_in_its_lora_layer_for_that_kind(tiny_flux1_model: Path, kind) -> None:
    from peft import LoraConfig

    transformer = _transformer(tiny_flux1_model)
    quantize_denoiser(transformer, kind, torch.device("cpu"))
    transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q"]))
    layer = transformer.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == ("Linear4bit" if kind == "nf4" else "TorchaoLoraLinear")
    assert is_quantized(layer.base_layer) and not is_quantized(layer.lora_A["default"])


def _bytes(param: torch.Tensor) -> int:
    if hasattr(param, "qdata"):  # torchao's Int8Tensor/Float8Tensor: the data and its scales
        return sum(t.numel() * t.element_size() for t in (param.qdata, param.scale))
    return param.numel() * param.element_size()


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_training_on_a_quantized_base_learns_the_same_lora_layout_close_to_the_unquantized_run(
    tiny_flux1_model: Path, examples: list[Example], unquantized, kind
) -> None:
    """peft attaches its LoRA to the quantized linears (TorchaoLoraLinear): the LoRA trains,
    with the same keys and shapes as on the unquantized base, and losses near (not equal to)
    that run's: the base's weights are rounded, nothing else changed."""
    outcome = train_lora(_flux_params(quantize_base=kind), "flux1", tiny_flux1_model, examples)
    assert outcome.quantize_base == kind and outcome.quantized_linears > 0
    assert {k: v.shape for k, v in outcome.denoiser_lora.items()} == {
        k: v.shape for k, v in unquantized.denoiser_lora.items()
    }
    assert all(v.dtype == torch.float32 for v in outcome.denoiser_lora.values())
    assert outcome.losses != unquantized.losses  # the rounded base is what it trained on
    torch.testing.assert_close(torch.tensor(outcome.losses), torch.tensor(unquantized.losses), rtol=0.1, atol=0.02)
    changed = [k for k in outcome.denoiser_lora if "lora_B" in k and outcome.denoiser_lora[k].abs().sum() > 0]
    assert changed  # lora_B starts at zero: the adapters learned


@pytest.mark.skipif(not HAS_BNB, reason="nf4 needs bitsandbytes (the qlora extra), not installed here")
def test_training_on_an_nf4_base_puts_peft_4bit_lora_on_bitsandbytes_layers(
    tiny_flux1_model: Path, examples: list[Example], unquantized
) -> None:
    outcome = train_lora(_flux_params(quantize_base="nf4"), "flux1", tiny_flux1_model, examples)
    assert outcome.quantize_base == "nf4" and outcome.quantized_linears > 0
    assert outcome.denoiser_lora.keys() == unquantized.denoiser_lora.keys()
    assert all(torch.isfinite(torch.tensor(outcome.losses)))


def test_the_lora_trained_on_an_int8_base_loads_into_the_unquantized_pipeline_and_the_header_says_int8(
    tiny_flux1_model: Path, tmp_path: Path
) -> None:
    from diffusers import FluxPipeline
    from safetensors import safe_open

    trained = train_and_write(
        tiny_flux1_model, "flux1", "dev", tmp_path, quantize_base="int8", target_modules=FLUX_TARGETS, max_train_steps=2
    )
    with safe_open(str(trained.diffusers_file), "pt") as handle:
        meta = handle.metadata()
    assert meta["lora_pipeline.quantize_base"] == "int8"
    pipe = FluxPipeline.from_pretrained(tiny_flux1_model)
    pipe.load_lora_weights(str(trained.diffusers_file))
    modules = dict(pipe.transformer.named_modules())
    name = next(k for k in trained.outcome.denoiser_lora if k.endswith(".lora_B.weight"))
    loaded = modules[name.removesuffix(".lora_B.weight")].lora_B["default_0"].weight
    torch.testing.assert_close(loaded, trained.outcome.denoiser_lora[name])
    assert not any(is_quantized(m) for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))


def test_a_quantization_whose_library_is_missing_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(WorkerInputError, match="'int8' needs the torchao package"):
        check_quantization_available("int8")
    check_quantization_available("none")


# -- gradient checkpointing --------------------------------------------------------------------


def _saved_bytes_and_checkpoints(monkeypatch: pytest.MonkeyPatch, train) -> tuple[object, int, int]:
    """(what ``train()`` returns, bytes the autograd graph kept for backward outside checkpointed
    blocks, how many block calls went through torch's checkpoint)."""
    import torch.utils.checkpoint as checkpoint_module

    calls = [0]
    real = checkpoint_module.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "checkpoint", counting)
    kept = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = train()
    monkeypatch.setattr(checkpoint_module, "checkpoint", real)
    return result, kept[0], calls[0]


@pytest.mark.parametrize(
    ("family", "model_fixture", "targets"),
    [
        ("sd1", "tiny_model", ["to_q", "to_k", "to_v", "to_out.0"]),
        ("flux1", "tiny_flux1_model", FLUX_TARGETS),
        ("sd3", "tiny_sd3_model", ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]),
    ],
)
def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_losses(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, examples, family, model_fixture, targets
) -> None:
    """diffusers' transformers (and the UNet) checkpoint each block when asked: the graph keeps
    only the blocks' inputs, and the recomputed forward is the same arithmetic (exact)."""
    model = request.getfixturevalue(model_fixture)
    runs = {}
    for on in (False, True):
        params = quick_params(target_modules=targets, max_train_steps=2, gradient_checkpointing=on)
        runs[on] = _saved_bytes_and_checkpoints(monkeypatch, lambda p=params: train_lora(p, family, model, examples))
    (plain, plain_kept, plain_calls), (checkpointed, kept, calls) = runs[False], runs[True]
    assert plain_calls == 0 and calls > 0
    assert kept < plain_kept / 2
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    assert checkpointed.losses == plain.losses
    for key, value in plain.denoiser_lora.items():
        torch.testing.assert_close(checkpointed.denoiser_lora[key], value, rtol=0, atol=1e-6)


# -- cached latents and text embeddings, encoders released ---------------------------------------


def test_each_image_and_caption_is_encoded_once_and_the_text_encoders_are_released(
    monkeypatch: pytest.MonkeyPatch, tiny_flux1_model: Path, examples
) -> None:
    """The VAE encodes each image once and the text encoders each caption once, before the first
    step, however many steps follow; then the encoders are gone (released, not just moved) and the
    VAE is on the host, before the denoiser reaches the device."""
    import gc
    import weakref

    from diffusers import AutoencoderKL

    from lora_pipeline.worker import train as train_module
    from lora_pipeline.worker.families.flux1 import Flux1

    encoded: list[str] = []
    captions: list[str] = []
    real_encode, real_prompts, real_offload = (
        AutoencoderKL.encode,
        Flux1.encode_prompts,
        train_module.offload_cached_encoders,
    )
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, *a, **k: encoded.append("image") or real_encode(self, *a, **k)
    )
    monkeypatch.setattr(
        Flux1, "encode_prompts", lambda self, loaded, c, d: captions.extend(c) or real_prompts(self, loaded, c, d)
    )
    seen = {}

    def offload(models, params, device):
        encoders = [*models.text_encoders, *models.frozen_encoders]
        seen["refs"] = [weakref.ref(e) for e in encoders]
        real_offload(models, params, device)
        seen["left"] = (list(models.text_encoders), list(models.frozen_encoders))
        seen["vae"] = {p.device.type for p in models.vae.parameters()}

    monkeypatch.setattr(train_module, "offload_cached_encoders", offload)
    outcome = train_lora(_flux_params(max_train_steps=4, train_batch_size=1), "flux1", tiny_flux1_model, examples)
    assert outcome.steps == 4
    assert len(encoded) == len(examples) and len(captions) == len(examples)  # once each, not per step
    assert seen["left"] == ([], []) and len(seen["refs"]) == 2  # FLUX.1: CLIP and T5
    assert seen["vae"] == {"cpu"}
    gc.collect()
    assert all(ref() is None for ref in seen["refs"])  # nothing holds them: their memory is free


def test_text_encoders_that_train_stay(tiny_model: Path, examples) -> None:
    from lora_pipeline.worker.families import family_for
    from lora_pipeline.worker.train import offload_cached_encoders

    models = family_for("sd1", tiny_model).load(torch.device("cpu"), torch.float32)
    encoder = models.text_encoders[0]
    offload_cached_encoders(models, quick_params(train_text_encoder=True), torch.device("cpu"))
    assert models.text_encoders == [encoder]


# -- bf16 base --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "base_dtype"), [("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_a_bf16_base_trains_a_fp32_lora_as_the_reference_scripts_do(
    monkeypatch: pytest.MonkeyPatch, tiny_flux1_model: Path, examples, asked, base_dtype
) -> None:
    """``mixed_precision`` bf16: the frozen denoiser (and text encoders) in bf16, the LoRA's own
    weights fp32 (their AdamW updates, lr × a small gradient, would round away in bf16's 8-bit
    mantissa), the VAE fp32; the forward runs under bf16 autocast. "auto" on the CPU is fp32."""
    from lora_pipeline.worker import train as train_module

    real = train_module.prepare_lora_training
    seen = {}

    def spy(family, models, params, levers, device, checkpointing):
        trainable, optimizer = real(family, models, params, levers, device, checkpointing)
        ids = {id(p) for p in trainable}
        seen["frozen"] = {p.dtype for p in models.denoiser.parameters() if id(p) not in ids}
        seen["lora"] = {p.dtype for p in trainable}
        seen["vae"] = {p.dtype for p in models.vae.parameters()}
        return trainable, optimizer

    monkeypatch.setattr(train_module, "prepare_lora_training", spy)
    outcome = train_lora(_flux_params(mixed_precision=asked), "flux1", tiny_flux1_model, examples)
    assert seen == {"frozen": {base_dtype}, "lora": {torch.float32}, "vae": {torch.float32}}
    assert outcome.mixed_precision == ("bf16" if asked == "bf16" else "no")
    assert all(torch.isfinite(torch.tensor(outcome.losses)))
    assert all(v.dtype == torch.float32 for v in outcome.denoiser_lora.values())
