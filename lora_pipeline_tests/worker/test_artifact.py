"""The LoRA files: the diffusers one loads with diffusers and changes the output, each header
carries its facts (kohya's keys only on the kohya file), the kohya one has A1111/ComfyUI names.
The real SD 1.5 / SDXL architectures are in test_lora_compat.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_pipeline.registry_store.lora_files import verify_local_file
from lora_pipeline.worker.artifact import (
    ArtifactFacts,
    base_model_name,
    facts_from_provenance,
    kohya_metadata,
    provenance_metadata,
    write_kohya_file,
    write_lora_file,
)
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.train import TrainOutcome, train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

# alpha ≠ rank on purpose: the scale alpha/rank must survive both file layouts.
PARAMS = quick_params(
    train_text_encoder=True, max_train_steps=4, learning_rate=5e-2, alpha=8, trigger_word="geoshapes style"
)


@pytest.fixture(scope="module")
def outcome(tiny_model: Path) -> TrainOutcome:
    examples = [Example(decode_image(d, n), c, n) for n, d, c in sample_images()]
    return train_lora(PARAMS, "sd1", tiny_model, examples)


def _facts(outcome: TrainOutcome) -> ArtifactFacts:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return ArtifactFacts(
        style="geo",
        version="V3",
        job_id="job-123-e1",
        request_id="req-9",
        dataset_hash="ab" * 32,
        base_model="tiny",
        family="sd1",
        params=PARAMS,
        steps=outcome.steps,
        num_train_images=8,
        tag_frequency={"geoshapes style": 8},
        training_seconds=12.5,
        started_at=now,
        finished_at=now,
        final_loss=outcome.final_loss,
    )


@pytest.fixture(scope="module")
def lora_file(outcome: TrainOutcome, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "geo_v3.safetensors"
    return write_lora_file(
        path,
        "sd1",
        outcome.denoiser_lora,
        provenance_metadata(_facts(outcome)),
        text_encoder_lora=outcome.text_encoder_lora,
        adapter_configs=outcome.adapter_configs,
    )


@pytest.fixture(scope="module")
def kohya_file(lora_file: Path, tiny_model: Path) -> Path:
    from lora_pipeline.worker.family import denoiser_config

    return write_kohya_file(
        lora_file, lora_file.with_name("geo_v3_kohya.safetensors"), denoiser_config=denoiser_config(tiny_model)
    )


def _render(pipe) -> torch.Tensor:
    out = pipe(
        "geoshapes style, a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return out


def test_lora_file_loads_into_the_pipeline_and_changes_its_output(tiny_model: Path, lora_file: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(lora_file))
    after = _render(pipe)
    assert (after - before).abs().max() > 1e-3


def test_every_tensor_is_a_lora_layer_of_the_unet_or_text_encoder(lora_file: Path) -> None:
    with safe_open(str(lora_file), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    # diffusers writes peft (lora_A/B) or its own (lora.down/up, lora_linear_layer) suffixes.
    lora_suffix = re.compile(r"\.(lora_[AB]|lora\.(up|down)|lora_linear_layer\.(up|down))\.weight$")
    assert all(lora_suffix.search(k) for k in keys), [k for k in keys if not lora_suffix.search(k)][:3]
    # CLIP's text_model level, as on every diffusers LoRA (transformers 5's CLIPTextModel lacks it).
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys if k.startswith("text_encoder."))


def test_the_diffusers_header_records_the_facts_and_no_kohya_keys(lora_file: Path) -> None:
    header, tensors_sha, _ = verify_local_file(lora_file)
    meta = header.metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["lora_pipeline.dataset_hash"] == "ab" * 32
    assert meta["lora_pipeline.job_id"] == "job-123-e1"
    assert meta["lora_pipeline.family"] == "sd1"
    assert (meta["lora_pipeline.rank"], meta["lora_pipeline.alpha"], meta["lora_pipeline.steps"]) == ("4", "8", "4")
    assert meta["lora_pipeline.trigger_word"] == "geoshapes style"
    assert meta["lora_pipeline.training_time"] == "12.5"
    assert meta["lora_pipeline.layout"] == "diffusers" and header.layout == "diffusers"
    assert meta["lora_pipeline.tensors_sha256"] == tensors_sha
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    assert [k for k in meta if k.startswith(("ss_", "modelspec.", "sshs_"))] == []


def test_the_kohya_header_has_sd_scripts_keys_and_the_same_provenance(lora_file: Path, kohya_file: Path) -> None:
    header, tensors_sha, _ = verify_local_file(kohya_file)
    meta = header.metadata
    ours = {k: v for k, v in verify_local_file(lora_file)[0].metadata.items() if k.startswith("lora_pipeline.")}
    assert {k: v for k, v in meta.items() if k.startswith("lora_pipeline.")} == {
        **ours,
        "lora_pipeline.layout": "kohya",
        "lora_pipeline.tensors_sha256": tensors_sha,
    }
    assert header.layout == "kohya" and meta["sshs_model_hash"] == tensors_sha
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "8.0",
    )
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_sd_model_name"]) == ("sd_v1", "False", "tiny")
    assert (meta["ss_steps"], meta["ss_num_train_images"]) == ("4", "8")
    assert json.loads(meta["ss_tag_frequency"]) == {"geo": {"geoshapes style": 8}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.trigger_phrase"] == "geoshapes style"
    assert meta["modelspec.title"] == meta["ss_output_name"] == "geo_v3"
    assert "lora_adapter_metadata" not in meta


def test_the_kohya_file_is_a_function_of_the_diffusers_file(
    lora_file: Path, kohya_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A twin job that lost the race derives the winner's kohya file again from its diffusers file."""
    from lora_pipeline.worker.family import denoiser_config

    again = write_kohya_file(lora_file, tmp_path / "again.safetensors", denoiser_config=denoiser_config(tiny_model))
    (header, data_sha, _), (first, first_sha, _) = verify_local_file(again), verify_local_file(kohya_file)
    # safetensors writes header entries in hash-map order, so compare them parsed; the data is bytewise
    assert (header.tensors, header.metadata, data_sha) == (first.tensors, first.metadata, first_sha)


def test_kohya_export_uses_the_a1111_comfyui_key_names(kohya_file: Path) -> None:
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys = list(handle.keys())
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert keys and all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)][:3]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert float(alpha) == 8.0 and alpha.dim() == 0
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(names)  # down, up and alpha for every module


def test_kohya_file_and_diffusers_file_give_the_same_image(tiny_model: Path, lora_file: Path, kohya_file: Path) -> None:
    """Same layers, same alpha/rank scale, whichever layout a tool reads."""
    from diffusers import StableDiffusionPipeline

    images = []
    for path in (lora_file, kohya_file):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path))
        images.append(_render(pipe))
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)


def _facts_for(family: str, prediction: str, **changes) -> ArtifactFacts:
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    values = dict(
        style="geo",
        version="V12",
        job_id="j",
        request_id="r",
        dataset_hash="cd" * 32,
        base_model="stabilityai/stable-diffusion-2",
        family=family,
        params=PARAMS,
        steps=7,
        num_train_images=3,
        tag_frequency={"a": 1},
        training_seconds=2.0,
        started_at=now,
        finished_at=now,
        final_loss=None,
        prediction_type=prediction,
    )
    values.update(changes)
    return ArtifactFacts(**values)


@pytest.mark.parametrize(
    ("family", "prediction", "base", "architecture", "implementation", "predicts"),
    [
        ("sd1", "epsilon", "sd_v1", "stable-diffusion-v1/lora", "diffusers", "epsilon"),
        ("sd2", "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
        ("sd2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers", "v"),
        (
            "sdxl",
            "epsilon",
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
            "epsilon",
        ),
    ],
)
def test_kohya_metadata_names_the_base_model_as_sd_scripts_does(
    family, prediction, base, architecture, implementation, predicts
) -> None:
    meta = kohya_metadata(_facts_for(family, prediction))
    assert meta["ss_base_model_version"] == base
    assert meta["ss_v2"] == str(family == "sd2")
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.prediction_type"] == predicts
    assert meta["ss_sd_model_name"] == "stabilityai/stable-diffusion-2"  # a hub id stays as given


def test_kohya_metadata_without_a_trigger_word_has_no_trigger_phrase() -> None:
    facts = _facts_for("sd1", "epsilon", params=PARAMS.model_copy(update={"trigger_word": None}))
    assert "modelspec.trigger_phrase" not in kohya_metadata(facts)
    assert kohya_metadata(_facts_for("sd1", "epsilon"))["modelspec.trigger_phrase"] == "geoshapes style"


@pytest.mark.parametrize(
    ("base_model", "name"),
    [
        ("tiny", "tiny"),
        ("store:models/sd15", "sd15"),
        ("store:models/sdxl/", "sdxl"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ],
)
def test_the_base_model_name_is_a_folder_name_or_the_hub_id(base_model: str, name: str) -> None:
    assert base_model_name(base_model) == name


def test_a_local_base_model_is_named_by_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "my-sd15"
    folder.mkdir(parents=True)
    assert base_model_name(str(folder)) == "my-sd15"


def test_the_facts_survive_the_header(outcome: TrainOutcome) -> None:
    facts = _facts(outcome)
    recorded = replace(facts, final_loss=float(f"{facts.final_loss:.6f}"))  # the header keeps 6 decimals
    assert facts_from_provenance(provenance_metadata(facts)) == recorded
    with pytest.raises(ValueError, match="lora_pipeline.family"):
        facts_from_provenance({})


def test_sdxl_lora_with_both_text_encoders_loads_and_changes_the_output(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lora_pipeline.worker.family import detect_family

    assert detect_family(tiny_sdxl_model) == "sdxl"
    examples = [Example(decode_image(d, n), c, n) for n, d, c in sample_images()[:4]]
    params = quick_params(train_text_encoder=True, max_train_steps=2, learning_rate=5e-2, resolution=64)
    outcome = train_lora(params, "sdxl", tiny_sdxl_model, examples)
    now = datetime(2026, 1, 2, tzinfo=UTC)
    facts = ArtifactFacts(
        style="xl",
        version="V1",
        job_id="j",
        request_id="r",
        dataset_hash="ab" * 32,
        base_model="tiny",
        family="sdxl",
        params=params,
        steps=2,
        num_train_images=4,
        tag_frequency={},
        training_seconds=1.0,
        started_at=now,
        finished_at=now,
        final_loss=None,
    )
    path = write_lora_file(
        tmp_path / "xl.safetensors",
        "sdxl",
        outcome.denoiser_lora,
        provenance_metadata(facts),
        text_encoder_lora=outcome.text_encoder_lora,
        text_encoder_2_lora=outcome.text_encoder_2_lora,
        adapter_configs=outcome.adapter_configs,
    )
    from lora_pipeline.worker.family import denoiser_config

    kohya = write_kohya_file(path, tmp_path / "xl_kohya.safetensors", denoiser_config=denoiser_config(tiny_sdxl_model))
    with safe_open(str(kohya), framework="pt") as handle:
        keys = list(handle.keys())
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    # sd-scripts' SDXL block names: the tiny UNet's attention blocks are input_blocks 4/5, output 0..2.
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert not [k for k in keys if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(path))
    assert (_render(pipe) - before).abs().max() > 1e-3


def test_the_prediction_type_comes_from_the_base_models_scheduler(tmp_path: Path, tiny_model: Path) -> None:
    """What marks an SD 2.x 768-v base as v-prediction in the kohya header (sd_v2_v, 768-v)."""
    from lora_pipeline.worker.family import prediction_type

    assert prediction_type(tiny_model) == "epsilon"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert prediction_type(tmp_path) == "v_prediction"
    assert prediction_type(tmp_path / "missing") == "epsilon"
