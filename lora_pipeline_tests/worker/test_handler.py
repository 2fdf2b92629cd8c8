"""The RunPod handler end to end on a local store, and every way a bad request is refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lora_pipeline.worker.train as train_module
from lora_pipeline.contracts.training import TrainingResult
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.handler import check_kohya_layout, handler, training_progress, with_dataset_trigger
from lora_pipeline_tests.worker.conftest import png_bytes, put_dataset, quick_params, request_dict


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the handler gets as far as training (bad input must be refused first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started for a request that should have been refused")

    monkeypatch.setattr(train_module, "train_lora", refuse)


def test_handler_trains_and_stores_the_lora_with_its_facts(store, sample_dataset: str) -> None:
    # export_kohya is retired: an old orchestrator's false is accepted, and both files are written.
    job = {
        "id": "job-abc-e1",
        "input": request_dict(
            store, sample_dataset, params={"export_kohya": False, "num_sample_images": 1, "sample_inference_steps": 2}
        ),
    }
    result = TrainingResult.model_validate(handler(job))

    assert result.lora_key == "loras/geo/geo_v1.safetensors"
    header = read_header(store, result.lora_key)
    assert header.metadata["lora_pipeline.job_id"] == "job-abc-e1"
    assert header.metadata["lora_pipeline.dataset_hash"] == sample_dataset
    assert result.steps == 8 and result.final_loss is not None
    assert result.kohya_key == "loras/geo/geo_v1_kohya.safetensors"
    assert result.files == {"kohya": result.kohya_key, "diffusers": result.lora_key}
    kohya = read_header(store, result.kohya_key)
    assert (header.layout, kohya.layout) == ("diffusers", "kohya")
    assert kohya.metadata["lora_pipeline.job_id"] == "job-abc-e1" and kohya.metadata["ss_steps"] == "8"
    assert header.checksum and kohya.checksum and header.checksum != kohya.checksum
    assert result.sample_keys == ["loras/geo/geo_v1_sample_0.png"]
    assert store.get(result.sample_keys[0]).data.startswith(b"\x89PNG")
    [sample] = result.samples  # described: prompt (a caption with the trigger word), seed, URL
    assert (sample.key, sample.seed, sample.url) == (result.sample_keys[0], 7, store.url(result.sample_keys[0]))
    assert sample.prompt
    assert list(store.list("checkpoints/")) == []  # cleared once the LoRA is stored


def test_retried_job_resumes_from_the_last_checkpoint(store, sample_dataset: str, monkeypatch) -> None:
    """RunPod retries a job as a new attempt (-e2); it must not start over."""
    request = request_dict(store, sample_dataset, params={"checkpoint_every": 3})
    real_train = train_module.train_lora
    outcomes = []

    def crash_at_step_4(*args, **kwargs):
        def progress(step, total, loss):
            if step == 4:
                raise RuntimeError("worker lost")

        kwargs["progress"] = progress
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_lora", crash_at_step_4)
    assert "worker lost" in handler({"id": "job-1-e1", "input": request})["error"]

    def record(*args, **kwargs):
        outcomes.append(real_train(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(train_module, "train_lora", record)
    result = handler({"id": "job-1-e2", "input": request})
    assert "error" not in result
    assert outcomes[0].resumed_from == 3


def test_retry_after_the_upload_returns_the_stored_result_without_training(
    store, sample_dataset: str, monkeypatch
) -> None:
    request = request_dict(store, sample_dataset, params={"max_train_steps": 2})
    first = handler({"id": "job-2-e1", "input": request})
    monkeypatch.setattr(train_module, "train_lora", lambda *a, **k: pytest.fail("trained again"))
    again = handler({"id": "job-2-e2", "input": request})
    assert again["lora_key"] == first["lora_key"] and again["steps"] == first["steps"]


def test_an_existing_lora_of_another_request_is_never_overwritten(store, sample_dataset: str, no_training) -> None:
    put_lora = request_dict(store, sample_dataset)
    store.put("loras/geo/geo_v1.safetensors", _minimal_safetensors({"lora_pipeline.request_id": "someone-else"}))
    result = handler({"id": "j", "input": put_lora})
    assert "already exists" in result["error"] and "someone-else" in result["error"]


def test_out_of_range_rank_is_refused_naming_the_field(store, sample_dataset: str, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, params={"rank": 1000})})
    assert "params.rank" in result["error"] and "1000" in result["error"]


def test_unknown_model_family_in_the_request_is_refused(store, sample_dataset: str, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, model_family="sd3")})
    assert "model_family" in result["error"]


def test_base_model_of_an_unknown_family_is_refused(store, sample_dataset: str, tmp_path: Path, no_training) -> None:
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (folder / "transformer" / "config.json").write_text("{}")
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, base_model=str(folder))})
    assert "which no family trains" in result["error"] and "WanPipeline" in result["error"]


def test_a_flux1_folder_without_its_transformer_config_is_refused_before_training(
    store, sample_dataset: str, tmp_path: Path, no_training
) -> None:
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, base_model=str(folder))})
    assert "transformer/config.json" in result["error"]


def test_family_mismatch_between_request_and_model_is_refused(store, sample_dataset: str, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, model_family="sdxl")})
    assert "model_family" in result["error"] and "'sd1'" in result["error"]


def test_dataset_without_images_is_refused(store, no_training) -> None:
    digest = put_dataset(store, [])
    assert "no images" in handler({"id": "j", "input": request_dict(store, digest)})["error"]


def test_corrupt_image_is_refused_naming_the_file(store, no_training) -> None:
    digest = put_dataset(store, [("ok.png", png_bytes((9, 9, 9)), "fine"), ("bad.png", b"\x89PNG\r\n\x1a\nnope", "x")])
    assert "corrupt image 'bad.png'" in handler({"id": "j", "input": request_dict(store, digest)})["error"]


def test_missing_dataset_is_refused_naming_the_hash(store, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, "deadbeef")})
    assert "dataset_hash" in result["error"] and "deadbeef" in result["error"]


def test_bad_version_name_is_refused(store, sample_dataset: str, no_training) -> None:
    assert "version" in handler({"id": "j", "input": request_dict(store, sample_dataset, version="latest")})["error"]


def test_job_without_input_is_refused() -> None:
    assert "input" in handler({"id": "j"})["error"]


def test_missing_store_is_refused_naming_the_setting(sample_dataset: str, store, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, storage_url=None)})
    assert "LORA_STORAGE_URL" in result["error"]


def test_unknown_field_is_refused_naming_it(store, sample_dataset: str, no_training) -> None:
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, params={"rnak": 4})})
    assert "params.rnak" in result["error"]


def test_importing_the_handler_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, lora_pipeline.worker.handler, lora_pipeline.contracts.training; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _minimal_safetensors(metadata: dict[str, str]) -> bytes:
    import struct

    header = json.dumps(
        {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


def test_a_lora_published_by_another_request_during_training_is_not_replaced(
    store, sample_dataset: str, monkeypatch
) -> None:
    """The check before training is not enough: the final upload itself is create-only."""
    real_train = train_module.train_lora
    theirs = _minimal_safetensors({"lora_pipeline.request_id": "someone-else"})

    def train_then_lose_the_race(*args, **kwargs):
        outcome = real_train(*args, **kwargs)
        store.put("loras/geo/geo_v1.safetensors", theirs)  # another job published meanwhile
        return outcome

    monkeypatch.setattr(train_module, "train_lora", train_then_lose_the_race)
    result = handler({"id": "j", "input": request_dict(store, sample_dataset)})
    assert "already exists" in result["error"] and "someone-else" in result["error"]
    assert store.get("loras/geo/geo_v1.safetensors").data == theirs


def test_a_second_job_of_the_same_request_returns_the_first_ones_file(store, sample_dataset: str, monkeypatch) -> None:
    """Two jobs of one request (a repeated /run) race to publish: one file, one result."""
    real_train = train_module.train_lora
    request = request_dict(store, sample_dataset)

    def train_while_a_twin_publishes(*args, **kwargs):
        outcome = real_train(*args, **kwargs)
        monkeypatch.setattr(train_module, "train_lora", real_train)
        twin = handler({"id": "twin", "input": request})  # publishes first
        assert "error" not in twin
        return outcome

    monkeypatch.setattr(train_module, "train_lora", train_while_a_twin_publishes)
    assert store.head("loras/geo/geo_v1.safetensors") is None
    result = handler({"id": "late", "input": request})
    header = read_header(store, "loras/geo/geo_v1.safetensors")
    assert "error" not in result and header.metadata["lora_pipeline.job_id"] == "twin"
    # The late job's kohya file replaced the twin's on its way; it is derived again from the
    # published diffusers file, so the pair holds one job's weights.
    kohya = read_header(store, "loras/geo/geo_v1_kohya.safetensors")
    assert kohya.metadata["lora_pipeline.job_id"] == "twin"
    assert _kohya_tensors_of(store, "loras/geo/geo_v1.safetensors") == kohya.checksum


def _kohya_tensors_of(store, key: str) -> str:
    """The tensor checksum of the kohya file derived from the diffusers file at ``key``."""
    import tempfile

    from lora_pipeline.registry_store.lora_files import verify_local_file
    from lora_pipeline.worker.artifact import write_kohya_file
    from lora_pipeline.worker.family import denoiser_config
    from lora_pipeline.worker.tiny_model import ensure_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        store.download_file(key, Path(tmp) / "d.safetensors")
        derived = write_kohya_file(
            Path(tmp) / "d.safetensors",
            Path(tmp) / "k.safetensors",
            denoiser_config=denoiser_config(ensure_tiny_model()),
        )
        return verify_local_file(derived)[1]


def test_the_kohya_file_goes_up_first_and_the_main_file_never_without_it(
    store, sample_dataset: str, monkeypatch
) -> None:
    """The main (diffusers) file is the commit point: uploaded last, and only after its pair."""
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.worker import handler as handler_module

    uploads: list[str] = []

    class Recording:
        def __init__(self, inner, fail_on: str | None = None):
            self.inner, self.fail_on = inner, fail_on

        def upload_file(self, key, path, **kwargs):
            uploads.append(key)
            if key == self.fail_on:
                raise StorageError(f"S3 put {key} failed: SlowDown")
            return self.inner.upload_file(key, path, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    request = request_dict(store, sample_dataset, params={"max_train_steps": 2})
    monkeypatch.setattr(
        handler_module, "open_request_store", lambda r: Recording(store, fail_on="loras/geo/geo_v1_kohya.safetensors")
    )
    assert "SlowDown" in handler({"id": "j-e1", "input": request})["error"]
    assert uploads == ["loras/geo/geo_v1_kohya.safetensors"] and store.head("loras/geo/geo_v1.safetensors") is None

    uploads.clear()
    monkeypatch.setattr(handler_module, "open_request_store", lambda r: Recording(store))
    assert "error" not in handler({"id": "j-e2", "input": request})
    assert uploads == ["loras/geo/geo_v1_kohya.safetensors", "loras/geo/geo_v1.safetensors"]


def test_an_unreadable_file_at_the_key_is_refused_not_replaced(store, sample_dataset: str, no_training) -> None:
    store.put("loras/geo/geo_v1.safetensors", b"not a safetensors file")
    result = handler({"id": "j", "input": request_dict(store, sample_dataset)})
    assert "not a readable LoRA" in result["error"] and "refusing to overwrite" in result["error"]
    assert store.get("loras/geo/geo_v1.safetensors").data == b"not a safetensors file"


def test_a_store_error_reading_the_existing_file_fails_the_job_instead_of_training(
    store, sample_dataset: str, monkeypatch, no_training
) -> None:
    """A read error never means "not trained yet" (that used to overwrite the file)."""
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.worker import handler as handler_module

    original = _minimal_safetensors({"lora_pipeline.request_id": "someone-else"})
    store.put("loras/geo/geo_v1.safetensors", original)

    class FlakyReads:
        def __init__(self, inner):
            self.inner = inner

        def get_range(self, key, start, length):
            raise StorageError(f"S3 get {key} failed: InternalError")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(handler_module, "open_request_store", lambda request: FlakyReads(store))
    result = handler({"id": "j", "input": request_dict(store, sample_dataset)})
    assert "InternalError" in result["error"]
    assert store.get("loras/geo/geo_v1.safetensors").data == original


# -- the job's steps alone ----------------------------------------------------------


def test_the_datasets_trigger_word_is_used_only_when_the_request_names_none() -> None:
    assert with_dataset_trigger(quick_params(trigger_word="mine"), "ingested").trigger_word == "mine"
    assert with_dataset_trigger(quick_params(), "ingested").trigger_word == "ingested"
    assert with_dataset_trigger(quick_params(), None).trigger_word is None


def test_training_progress_passes_on_about_ten_updates_and_always_the_last() -> None:
    updates: list[dict] = []
    on_step = training_progress(updates.append, quick_params(max_train_steps=25))
    for step in range(1, 26):
        on_step(step, 25, 0.1234567)
    assert [u["step"] for u in updates] == [*range(2, 25, 2), 25]
    assert updates[-1] == {"phase": "training", "step": 25, "total": 25, "loss": 0.123457}


def test_slow_training_steps_still_send_a_heartbeat_every_few_minutes() -> None:
    updates: list[dict] = []
    now = [0.0]
    on_step = training_progress(
        updates.append, quick_params(max_train_steps=1000), heartbeat_s=300, clock=lambda: now[0]
    )
    for step in range(1, 5):  # 4 steps of 200 s each: none is a tenth of the run
        now[0] += 200
        on_step(step, 1000, 0.5)
    assert [u["step"] for u in updates] == [2, 4]


def test_an_sdxl_unet_the_kohya_names_cannot_cover_is_refused_naming_the_base_model() -> None:
    with pytest.raises(WorkerInputError, match="base model: its UNet cannot be exported in the kohya layout"):
        check_kohya_layout({"down_block_types": ["DownBlock2D"], "up_block_types": []})
    check_kohya_layout({"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 2})


def test_a_family_mismatch_and_a_shift_on_a_unet_are_refused_by_the_worker_too(
    store, sample_dataset: str, no_training
) -> None:
    """What the launch check cannot see (a hub id) the worker refuses, in the same words."""
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, model_family="flux1")})
    assert result["error"].endswith("model_family 'flux1' does not match base_model 'tiny', a 'sd1' model")
    result = handler({"id": "j", "input": request_dict(store, sample_dataset, params={"timestep_shift": 3.0})})
    assert result["error"].endswith(
        "timestep_shift applies to the flow-matching families only; base_model 'tiny' is 'sd1'"
    )


def test_every_family_the_worker_trains_is_one_the_launch_check_knows() -> None:
    from lora_pipeline.contracts.families import FAMILIES
    from lora_pipeline.worker.families import FAMILIES as WORKER_FAMILIES

    assert {cls.name for cls in WORKER_FAMILIES} <= set(FAMILIES)
