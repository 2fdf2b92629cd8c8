"""The training loop on the tiny model: it learns, it resumes exactly, it repeats itself."""

from __future__ import annotations

import sys
import statistics
from pathlib import Path

import pytest
import torch

from lora_pipeline.storage.keys import checkpoint_prefix
from lora_pipeline.worker.checkpoint import StoreCheckpointer
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.train import (
    checkpoint_due,
    checkpoint_state,
    make_lr_scheduler,
    resumable_state,
    resume_from,
    resumed_batch_size,
    sample_noisy_inputs,
    train_lora,
)
from lora_pipeline_tests.worker.conftest import quick_params, sample_images


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


class Crash(Exception):
    """Stands in for a worker dying mid-job."""


def _assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_loss_falls_when_overfitting_a_few_images(tiny_model: Path, examples: list[Example]) -> None:
    params = quick_params(
        rank=8,
        learning_rate=1e-2,
        max_train_steps=60,
        train_batch_size=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    )
    losses = train_lora(params, "sd1", tiny_model, examples).losses
    assert statistics.mean(losses[-20:]) < 0.95 * statistics.mean(losses[:10])


def test_same_request_and_data_give_the_same_lora(tiny_model: Path, examples: list[Example]) -> None:
    first = train_lora(quick_params(), "sd1", tiny_model, examples)
    second = train_lora(quick_params(), "sd1", tiny_model, examples)
    _assert_same_lora(first.denoiser_lora, second.denoiser_lora)
    assert first.losses == second.losses


def test_a_different_seed_gives_a_different_lora(tiny_model: Path, examples: list[Example]) -> None:
    first = train_lora(quick_params(seed=1, max_train_steps=2), "sd1", tiny_model, examples)
    second = train_lora(quick_params(seed=2, max_train_steps=2), "sd1", tiny_model, examples)
    key = next(iter(first.denoiser_lora))
    assert not torch.equal(first.denoiser_lora[key], second.denoiser_lora[key])


def test_interrupted_and_resumed_run_ends_at_the_uninterrupted_weights(
    tiny_model: Path, examples: list[Example], store
) -> None:
    params = quick_params(max_train_steps=8, checkpoint_every=3, lr_scheduler="cosine", lr_warmup_steps=2)
    uninterrupted = train_lora(params, "sd1", tiny_model, examples)

    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", "req-1"))

    def crash_after_step_5(step: int, total: int, loss: float) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_lora(
            params, "sd1", tiny_model, examples, fingerprint="f", checkpointer=checkpointer, progress=crash_after_step_5
        )
    assert checkpointer.steps() == [3]

    resumed = train_lora(params, "sd1", tiny_model, examples, fingerprint="f", checkpointer=checkpointer)
    assert resumed.resumed_from == 3
    _assert_same_lora(resumed.denoiser_lora, uninterrupted.denoiser_lora)
    assert resumed.losses == pytest.approx(uninterrupted.losses, abs=1e-6)


def test_checkpoint_of_other_settings_is_not_resumed(tiny_model: Path, examples: list[Example], store) -> None:
    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", "req-2"))
    train_lora(
        quick_params(max_train_steps=4, checkpoint_every=2),
        "sd1",
        tiny_model,
        examples,
        fingerprint="old",
        checkpointer=checkpointer,
    )
    outcome = train_lora(
        quick_params(max_train_steps=4, checkpoint_every=2),
        "sd1",
        tiny_model,
        examples,
        fingerprint="new",
        checkpointer=checkpointer,
    )
    assert outcome.resumed_from is None


def test_text_encoder_lora_is_trained_when_asked(tiny_model: Path, examples: list[Example]) -> None:
    outcome = train_lora(quick_params(train_text_encoder=True, max_train_steps=2), "sd1", tiny_model, examples)
    assert outcome.text_encoder_lora and all("lora" in key for key in outcome.text_encoder_lora)


def test_gradient_accumulation_and_epochs_set_the_step_count(tiny_model: Path, examples: list[Example]) -> None:
    # 8 images in one bucket, batch 2 → 4 batches per epoch; 2 batches per update → 2 updates per epoch.
    params = quick_params(num_train_epochs=2, gradient_accumulation_steps=2, enable_bucketing=False)
    outcome = train_lora(params, "sd1", tiny_model, examples)
    assert outcome.steps == 4 and outcome.images_seen == 16


def test_unknown_target_module_is_refused_naming_the_field(tiny_model: Path, examples: list[Example]) -> None:
    with pytest.raises(WorkerInputError, match="params.target_modules"):
        train_lora(quick_params(target_modules=["no_such_layer"]), "sd1", tiny_model, examples)


def test_eight_bit_optimizer_without_bitsandbytes_is_a_clear_error(
    tiny_model: Path, examples, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # a worker without it: the import fails
    with pytest.raises(WorkerInputError, match="bitsandbytes"):
        train_lora(quick_params(optimizer="adamw8bit"), "sd1", tiny_model, examples)


def test_gradient_checkpointing_trades_time_not_results(tiny_model: Path, examples: list[Example]) -> None:
    plain = train_lora(quick_params(max_train_steps=2), "sd1", tiny_model, examples)
    checkpointed = train_lora(quick_params(max_train_steps=2, gradient_checkpointing=True), "sd1", tiny_model, examples)
    _assert_same_lora(plain.denoiser_lora, checkpointed.denoiser_lora)


def test_bf16_mixed_precision_trains_close_to_fp32(tiny_model: Path, examples: list[Example]) -> None:
    fp32 = train_lora(quick_params(max_train_steps=2), "sd1", tiny_model, examples)
    bf16 = train_lora(quick_params(max_train_steps=2, mixed_precision="bf16"), "sd1", tiny_model, examples)
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)


# -- the loop's steps alone: resume and checkpoint, the per-step draws ------------------


class _Checkpoints:
    """A checkpointer holding one state; saving is not expected."""

    def __init__(self, state: dict | None) -> None:
        self.state = state

    def load_latest(self) -> dict | None:
        return self.state

    def save(self, step: int, state: dict) -> None:
        raise AssertionError("nothing should be saved")


def test_only_a_checkpoint_of_this_run_is_resumed() -> None:
    mine = {"fingerprint": "fp", "step": 4}
    assert resumable_state(None, "fp") is None
    assert resumable_state(_Checkpoints(None), "fp") is None
    assert resumable_state(_Checkpoints({"fingerprint": "other settings", "step": 4}), "fp") is None
    assert resumable_state(_Checkpoints(mine), "fp") is mine


def test_a_resumed_run_keeps_the_batch_size_it_was_checkpointed_with() -> None:
    params = quick_params(train_batch_size=2)
    assert resumed_batch_size({"batch_size": 6}, params) == 6  # raised by levers.max_batch before the crash
    assert resumed_batch_size({}, params) == 2  # a checkpoint written before the batch size was recorded


def test_checkpoints_fall_every_n_steps_but_not_on_the_last() -> None:
    every_3 = quick_params(checkpoint_every=3)
    assert [done for done in range(1, 10) if checkpoint_due(every_3, _Checkpoints(None), done, 9)] == [3, 6]
    assert not checkpoint_due(every_3, None, 3, 9)
    assert not checkpoint_due(quick_params(checkpoint_every=0), _Checkpoints(None), 3, 9)


def _tiny_run(params, init_seed: int):
    torch.manual_seed(init_seed)
    layer = torch.nn.Linear(4, 2)
    trainable = list(layer.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
    return layer, trainable, optimizer, make_lr_scheduler(params, optimizer, n_steps=10)


def _take_steps(layer, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        layer(torch.randn(3, 4)).square().mean().backward()  # draws from the global RNG, as dropout would
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_a_checkpoint_resumes_the_weights_optimizer_schedule_and_rng_exactly(store) -> None:
    params = quick_params(learning_rate=0.1, lr_scheduler="cosine", lr_warmup_steps=2)
    layer, trainable, optimizer, scheduler = _tiny_run(params, init_seed=0)
    _take_steps(layer, optimizer, scheduler, 3)
    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", "req-unit"))
    checkpointer.save(3, checkpoint_state("fp", 3, 2, trainable, optimizer, scheduler, None, [0.5, 0.4, 0.3]))
    _take_steps(layer, optimizer, scheduler, 4)

    other, resumed, resumed_optimizer, resumed_scheduler = _tiny_run(params, init_seed=1)
    state = resumable_state(checkpointer, "fp")
    assert state is not None and state["batch_size"] == 2
    assert resume_from(state, resumed, resumed_optimizer, resumed_scheduler, None) == (3, [0.5, 0.4, 0.3])
    _take_steps(other, resumed_optimizer, resumed_scheduler, 4)
    for expected, got in zip(trainable, resumed, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_micro_steps_draws_depend_on_the_seed_step_and_micro_step_alone() -> None:
    mean, std = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)

    def draw(**overrides):
        args = dict(
            seed=7,
            step=3,
            micro=0,
            draw_timesteps=lambda n, gen, device: torch.randint(0, 1000, (n,), generator=gen, device=device),
            scaling=0.18,
            shift=0.0,
            device=torch.device("cpu"),
            device_gen=None,
        )
        args.update(overrides)
        return sample_noisy_inputs(mean, std, 2, **args)

    first = draw()
    torch.rand(5)  # the global RNG moving on changes nothing
    assert all(torch.equal(a, b) for a, b in zip(first, draw(), strict=True))
    assert not torch.equal(first[1], draw(micro=1)[1]) and not torch.equal(first[1], draw(step=4)[1])
    # levers.device_cache draws on the device: on the CPU that is the same stream.
    same = draw(device_gen=torch.Generator(device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first, same, strict=True))
