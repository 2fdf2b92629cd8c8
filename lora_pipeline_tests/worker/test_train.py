"""The training loop on the tiny model: it learns, it resumes exactly, it repeats itself."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from lora_pipeline.worker.checkpoint import StoreCheckpointer, checkpoint_prefix
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.train import train_lora
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
        rank=8, learning_rate=1e-2, max_train_steps=60, train_batch_size=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    )
    losses = train_lora(params, "sd1", tiny_model, examples).losses
    assert statistics.mean(losses[-20:]) < 0.95 * statistics.mean(losses[:10])


def test_same_request_and_data_give_the_same_lora(tiny_model: Path, examples: list[Example]) -> None:
    first = train_lora(quick_params(), "sd1", tiny_model, examples)
    second = train_lora(quick_params(), "sd1", tiny_model, examples)
    _assert_same_lora(first.unet_lora, second.unet_lora)
    assert first.losses == second.losses


def test_a_different_seed_gives_a_different_lora(tiny_model: Path, examples: list[Example]) -> None:
    first = train_lora(quick_params(seed=1, max_train_steps=2), "sd1", tiny_model, examples)
    second = train_lora(quick_params(seed=2, max_train_steps=2), "sd1", tiny_model, examples)
    key = next(iter(first.unet_lora))
    assert not torch.equal(first.unet_lora[key], second.unet_lora[key])


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
        train_lora(params, "sd1", tiny_model, examples, fingerprint="f", checkpointer=checkpointer,
                   progress=crash_after_step_5)
    assert checkpointer.steps() == [3]

    resumed = train_lora(params, "sd1", tiny_model, examples, fingerprint="f", checkpointer=checkpointer)
    assert resumed.resumed_from == 3
    _assert_same_lora(resumed.unet_lora, uninterrupted.unet_lora)
    assert resumed.losses == pytest.approx(uninterrupted.losses, abs=1e-6)


def test_checkpoint_of_other_settings_is_not_resumed(tiny_model: Path, examples: list[Example], store) -> None:
    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", "req-2"))
    train_lora(quick_params(max_train_steps=4, checkpoint_every=2), "sd1", tiny_model, examples,
               fingerprint="old", checkpointer=checkpointer)
    outcome = train_lora(quick_params(max_train_steps=4, checkpoint_every=2), "sd1", tiny_model, examples,
                         fingerprint="new", checkpointer=checkpointer)
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


def test_eight_bit_optimizer_without_bitsandbytes_is_a_clear_error(tiny_model: Path, examples) -> None:
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(WorkerInputError, match="bitsandbytes"):
        train_lora(quick_params(optimizer="adamw8bit"), "sd1", tiny_model, examples)


def test_gradient_checkpointing_trades_time_not_results(tiny_model: Path, examples: list[Example]) -> None:
    plain = train_lora(quick_params(max_train_steps=2), "sd1", tiny_model, examples)
    checkpointed = train_lora(quick_params(max_train_steps=2, gradient_checkpointing=True), "sd1", tiny_model, examples)
    _assert_same_lora(plain.unet_lora, checkpointed.unet_lora)


def test_bf16_mixed_precision_trains_close_to_fp32(tiny_model: Path, examples: list[Example]) -> None:
    fp32 = train_lora(quick_params(max_train_steps=2), "sd1", tiny_model, examples)
    bf16 = train_lora(quick_params(max_train_steps=2, mixed_precision="bf16"), "sd1", tiny_model, examples)
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)
