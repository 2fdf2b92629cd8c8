"""Every transformer family on its tiny model: the loss falls on a fixed batch, and a run
interrupted after a checkpoint and resumed ends at the uninterrupted run's losses and weights."""

from __future__ import annotations

import statistics

import pytest
import torch

from lora_pipeline.storage.keys import checkpoint_prefix
from lora_pipeline.worker.checkpoint import StoreCheckpointer
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.train import train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

# family → (tiny model fixture, LoRA targets that reach most of its layer kinds)
FAMILIES = {
    "flux1": (
        "tiny_flux1_model",
        ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"],
    ),
    "flux2-klein": (
        "tiny_flux2_klein_model",
        [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "ff.linear_in",
            "to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out",
        ],
    ),
    "sd3": (
        "tiny_sd3_model",
        ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "proj_out"],
    ),
    "z-image": (
        "tiny_z_image_model",
        [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "w1",
            "w2",
            "w3",
            "layers.0.adaLN_modulation.0",
            "adaLN_modulation.1",
            "linear",
        ],
    ),
    "qwen-image": (
        "tiny_qwen_image_model",
        [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "to_add_out",
            "img_mlp.net.2",
            "txt_mlp.net.0.proj",
            "img_mod.1",
        ],
    ),
}


class Crash(Exception):
    """Stands in for a worker dying mid-job."""


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_falls_on_a_fixed_batch(family: str, request: pytest.FixtureRequest, examples: list[Example]) -> None:
    fixture, targets = FAMILIES[family]
    params = quick_params(rank=8, learning_rate=1e-2, max_train_steps=40, train_batch_size=4, target_modules=targets)
    losses = train_lora(params, family, request.getfixturevalue(fixture), examples[:4]).losses  # type: ignore[arg-type]
    assert statistics.mean(losses[-10:]) < 0.95 * statistics.mean(losses[:10])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_resumed_run_equals_the_uninterrupted_one(
    family: str, request: pytest.FixtureRequest, examples: list[Example], store
) -> None:
    model = request.getfixturevalue(FAMILIES[family][0])
    params = quick_params(max_train_steps=6, checkpoint_every=2)
    uninterrupted = train_lora(params, family, model, examples)  # type: ignore[arg-type]
    checkpointer = StoreCheckpointer(store, checkpoint_prefix("geo", "V1", f"req-{family}"))

    def crash_after_step_3(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_lora(params, family, model, examples, checkpointer=checkpointer, progress=crash_after_step_3)  # type: ignore[arg-type]
    resumed = train_lora(params, family, model, examples, checkpointer=checkpointer)  # type: ignore[arg-type]
    assert resumed.resumed_from == 2 and resumed.losses == uninterrupted.losses
    for key, value in uninterrupted.denoiser_lora.items():
        torch.testing.assert_close(resumed.denoiser_lora[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "target"),
    [("flux1", "norm_out.linear"), ("flux2-klein", "double_stream_modulation_img.linear")],
)
def test_a_target_the_comfyui_file_cannot_name_is_refused_before_the_first_step(
    family: str, target: str, request: pytest.FixtureRequest, examples: list[Example]
) -> None:
    from lora_pipeline.worker.errors import WorkerInputError

    steps: list[int] = []
    params = quick_params(max_train_steps=2, target_modules=["to_q", target])
    with pytest.raises(WorkerInputError, match=f"params.target_modules: .*{target.split('.')[0]}"):
        train_lora(
            params,
            family,  # type: ignore[arg-type]
            request.getfixturevalue(FAMILIES[family][0]),
            examples,
            progress=lambda step, total, loss: steps.append(step),
        )
    assert steps == []  # refused before any training step was spent
