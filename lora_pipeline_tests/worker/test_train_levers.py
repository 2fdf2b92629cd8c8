"""The speed levers of the training loop, each on its own, on the tiny model and the CPU.

Each lever either gives the same numbers as the plain loop (host sync, device cache,
fused QKV, compile) or changes one documented thing (static shapes: a short batch is
topped up from its bucket; max batch: a larger batch, the same images). How much
each one saves is a GPU measurement (benchmarks/gpu/bench_gpu.py), not a test.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lora_pipeline.storage.keys import checkpoint_prefix
from lora_pipeline.worker import levers as levers_module
from lora_pipeline.worker import train as train_module
from lora_pipeline.worker.checkpoint import StoreCheckpointer
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.levers import (
    SpeedLevers,
    compile_unet,
    fill_short_batches,
    fuse_qkv,
    largest_batch,
    training_settings,
)
from lora_pipeline.worker.train import train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

PLAIN = SpeedLevers(log_every=1, device_cache=False)  # the loop as it was before the levers


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


@pytest.fixture(scope="module")
def plain_run(tiny_model: Path, examples: list[Example]):
    calls: list[tuple[int, int, float]] = []
    outcome = train_lora(
        quick_params(max_train_steps=6),
        "sd1",
        tiny_model,
        examples,
        levers=PLAIN,
        progress=lambda *call: calls.append(call),
    )
    return outcome, calls


def _same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


class Crash(Exception):
    pass


def test_losses_reach_the_host_every_n_steps_with_the_same_values_and_progress(
    tiny_model: Path, examples: list[Example], plain_run, store
) -> None:
    plain, plain_calls = plain_run
    params = quick_params(max_train_steps=6)
    calls: list[tuple[int, int, float]] = []
    batched = train_lora(
        params,
        "sd1",
        tiny_model,
        examples,
        levers=SpeedLevers(log_every=4, device_cache=False),
        progress=lambda *call: calls.append(call),
    )
    assert batched.losses == plain.losses
    assert calls == plain_calls  # every step reported once, in order, with its own loss
    assert [step for step, _, _ in calls] == [1, 2, 3, 4, 5, 6]
    _same_lora(batched.denoiser_lora, plain.denoiser_lora)

    # A checkpoint brings the pending losses to the host first: a resumed run still matches.
    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", "req-levers"))
    resumable = quick_params(max_train_steps=6, checkpoint_every=3)

    def crash_at_5(step: int, total: int, loss: float) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_lora(
            resumable,
            "sd1",
            tiny_model,
            examples,
            fingerprint="f",
            checkpointer=checkpointer,
            progress=crash_at_5,
            levers=SpeedLevers(log_every=4, device_cache=False),
        )
    resumed = train_lora(
        resumable,
        "sd1",
        tiny_model,
        examples,
        fingerprint="f",
        checkpointer=checkpointer,
        levers=SpeedLevers(log_every=4, device_cache=False),
    )
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(plain.losses, abs=1e-6)
    _same_lora(resumed.denoiser_lora, plain.denoiser_lora, atol=1e-6)


def test_cache_kept_on_the_device_draws_the_same_numbers(tiny_model: Path, examples: list[Example], plain_run) -> None:
    plain, _ = plain_run
    indexed = train_lora(
        quick_params(max_train_steps=6), "sd1", tiny_model, examples, levers=SpeedLevers(log_every=1, device_cache=True)
    )
    assert indexed.losses == plain.losses
    _same_lora(indexed.denoiser_lora, plain.denoiser_lora)


def test_device_cache_serves_sdxl_conditioning(tiny_sdxl_model: Path, examples: list[Example]) -> None:
    params = quick_params(max_train_steps=3)
    stacked = train_lora(params, "sdxl", tiny_sdxl_model, examples, levers=SpeedLevers(device_cache=True))
    plain = train_lora(params, "sdxl", tiny_sdxl_model, examples, levers=PLAIN)
    assert stacked.losses == plain.losses


def test_short_batches_are_topped_up_from_their_own_bucket() -> None:
    buckets = [(64, 64)] * 5 + [(32, 96)] * 2
    batches = [[4, 1], [6], [0, 3], [2], [5]]
    filled = fill_short_batches(batches, buckets, batch_size=2)
    assert filled == [[4, 1], [6, 5], [0, 3], [2, 4], [5, 6]]
    assert all(len({buckets[i] for i in batch}) == 1 for batch in filled)


def _unet_batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch of every UNet call the loop makes."""
    sizes: list[int] = []
    original = train_module.compile_unet

    def spying_compile(unet, levers):
        unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
        return original(unet, levers)

    monkeypatch.setattr(train_module, "compile_unet", spying_compile)
    return sizes


def test_static_shapes_give_every_step_of_a_bucket_one_batch_shape(
    tiny_model: Path, examples: list[Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    five = examples[:5]  # batch 2 → batches of 2, 2 and a short 1 each epoch
    params = quick_params(max_train_steps=6, enable_bucketing=False)
    sizes = _unet_batch_sizes(monkeypatch)
    ragged = train_lora(params, "sd1", tiny_model, five, levers=SpeedLevers(static_shapes=False))
    assert sorted(set(sizes)) == [1, 2]
    sizes.clear()
    static = train_lora(params, "sd1", tiny_model, five, levers=SpeedLevers(static_shapes=True))
    assert set(sizes) == {2}
    assert static.images_seen == 12 and ragged.images_seen == 10
    assert static.levers["static_shapes"] is True


def test_static_shapes_follow_compile_unless_set() -> None:
    cpu = torch.device("cpu")
    assert SpeedLevers().resolve(cpu, params_compile=False).static_shapes is False
    assert SpeedLevers(compile="regional").resolve(cpu, params_compile=False).static_shapes is True
    assert SpeedLevers().resolve(cpu, params_compile=True).compile == "full"
    assert SpeedLevers(compile="full", static_shapes=False).resolve(cpu, False).static_shapes is False


def _lora_unet(tiny_model: Path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():  # B starts at zero; give it values so the LoRA path counts
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return unet


def _forward_backward(unet, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 32, 32, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    out = unet(sample, torch.tensor([10, 500]), text, return_dict=False)[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_fused_qkv_computes_what_separate_projections_compute(tiny_model: Path) -> None:
    separate = _lora_unet(tiny_model)
    fused = copy.deepcopy(separate)
    from diffusers.models.attention_processor import Attention

    assert fuse_qkv(fused) == sum(isinstance(m, Attention) for m in fused.modules()) > 0
    assert {type(m.processor).__name__ for m in fused.modules() if hasattr(m, "processor")} == {"FusedAttnProcessor2_0"}

    out_a, grads_a = _forward_backward(separate)
    out_b, grads_b = _forward_backward(fused)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # The LoRA as saved is untouched: same keys, and the base weights are not stored twice.
    from peft.utils import get_peft_model_state_dict

    assert get_peft_model_state_dict(fused).keys() == get_peft_model_state_dict(separate).keys()
    attn = next(m for m in fused.modules() if hasattr(m, "to_qkv"))
    assert attn.to_q.base_layer.weight.data_ptr() == attn.to_qkv.weight.data_ptr()


def test_fused_qkv_trains_the_same_lora(tiny_model: Path, examples: list[Example], plain_run) -> None:
    plain, _ = plain_run
    fused = train_lora(
        quick_params(max_train_steps=6),
        "sd1",
        tiny_model,
        examples,
        levers=SpeedLevers(log_every=1, device_cache=False, fuse_qkv=True),
    )
    _same_lora(fused.denoiser_lora, plain.denoiser_lora, atol=1e-5)
    assert fused.losses == pytest.approx(plain.losses, abs=1e-5)


def test_compile_lever_compiles_the_whole_unet_or_its_transformer_blocks(tiny_model: Path) -> None:
    # Compiling is lazy: this checks what gets compiled. Training through a compiled UNet
    # (dynamo's "eager" backend on the CPU) is the dry run's job, in test_gpu_bench.py.
    cpu = torch.device("cpu")

    def resolved(choice: str) -> SpeedLevers:
        return SpeedLevers(compile=choice, compile_backend="eager").resolve(cpu, params_compile=False)

    def compiled_blocks(unet) -> list[bool]:
        return [
            m._compiled_call_impl is not None for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"
        ]

    unet = _lora_unet(tiny_model)
    assert compile_unet(unet, resolved("regional")) is unet
    assert compiled_blocks(unet) and all(compiled_blocks(unet))
    whole = compile_unet(_lora_unet(tiny_model), resolved("full"))
    assert isinstance(whole, torch._dynamo.eval_frame.OptimizedModule) and not any(compiled_blocks(whole._orig_mod))
    plain = _lora_unet(tiny_model)
    assert compile_unet(plain, resolved("off")) is plain and not any(compiled_blocks(plain))


def test_tf32_lever_applies_while_training_and_is_restored(tiny_model: Path, examples: list[Example]) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen = []
    train_lora(
        quick_params(max_train_steps=1),
        "sd1",
        tiny_model,
        examples,
        levers=SpeedLevers(tf32=True),
        progress=lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)),
    )
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with training_settings(SpeedLevers(tf32=False).resolve(torch.device("cpu"), False)):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with training_settings(SpeedLevers().resolve(torch.device("cpu"), False)):  # default: torch's own
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize(
    ("limit", "start", "cap", "expected"),
    [(13, 2, 64, 13), (64, 2, 64, 64), (100, 4, 48, 48), (3, 4, 64, 4), (2, 2, 64, 2), (1, 1, 1, 1)],
)
def test_largest_batch_search_finds_the_largest_that_fits(limit: int, start: int, cap: int, expected: int) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= limit

    assert largest_batch(fits, start, cap) == expected
    assert all(start <= batch <= cap for batch in tried)
    assert len(tried) <= 2 * cap.bit_length() + 1


def test_max_batch_trains_at_the_largest_batch_on_the_same_images(
    tiny_model: Path, examples: list[Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[int] = []

    def fake_probe(device, step, fraction):
        def fits(batch: int) -> bool:
            step(batch)  # the real probe step (forward + backward) runs, here on the CPU
            probed.append(batch)
            return batch <= 5

        return fits

    monkeypatch.setattr(train_module, "memory_probe", fake_probe)
    params = quick_params(max_train_steps=6, train_batch_size=2, enable_bucketing=False)
    outcome = train_lora(params, "sd1", tiny_model, examples, levers=SpeedLevers(max_batch=True, max_batch_cap=8))
    assert outcome.batch_size == 5 and probed[0] == 2
    assert outcome.steps == 3  # 6 steps × 2 images = 12 images ≈ 3 steps × 5
    assert outcome.images_seen == 5 + 3 + 5  # 8 images: batches of 5 and 3 per epoch


def test_max_batch_without_a_gpu_keeps_the_requested_batch(tiny_model: Path, examples: list[Example]) -> None:
    outcome = train_lora(
        quick_params(max_train_steps=2), "sd1", tiny_model, examples, levers=SpeedLevers(max_batch=True)
    )
    assert outcome.batch_size == 2 and outcome.steps == 2


def test_levers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        levers_module.LEVERS_ENV,
        "fuse_qkv=1, compile=regional, compile_mode=max-autotune-no-cudagraphs, log_every=5, "
        "static_shapes=auto, tf32=off",
    )
    levers = SpeedLevers.from_env()
    assert levers == SpeedLevers(
        fuse_qkv=True,
        compile="regional",
        compile_mode="max-autotune-no-cudagraphs",
        log_every=5,
        static_shapes=None,
        tf32=False,
    )
    with pytest.raises(ValueError, match="not name=value"):
        SpeedLevers.parse("fuse_qvk=1")
    with pytest.raises(ValueError, match="not a boolean"):
        SpeedLevers.parse("fuse_qkv=maybe")


def test_bad_lever_values_are_refused_before_training() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="compile_mode"):
        SpeedLevers(compile="full", compile_mode="max-autotune-no-cudagrahps").resolve(cpu, False)
    with pytest.raises(ValueError, match="compile"):
        SpeedLevers(compile="everything").resolve(cpu, False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every"):
        SpeedLevers(log_every=0).resolve(cpu, False)
    assert SpeedLevers().resolve(cpu, False).log_every == 1
    assert SpeedLevers().resolve(torch.device("cuda"), False).log_every == 10
