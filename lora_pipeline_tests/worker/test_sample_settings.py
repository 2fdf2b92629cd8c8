"""Samples by default, and sample settings outside a version's identity (issue 23): the tiny
preset renders 2 samples, a real base model 4; asking an existing version for other samples
renders them for that version, never a new training."""

from __future__ import annotations

import json
import subprocess

import pytest

from lora_pipeline.contracts.training import TrainingParams, missing_samples, sample_key, version_identity
from lora_pipeline.dataset.versions import read_manifest, set_current
from lora_pipeline.lifecycle.samples import SampleRenderingFailed, render_missing_samples
from lora_pipeline.lifecycle.submit import submit_training, training_params
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.worker.conftest import STYLE
from lora_pipeline_tests.worker.test_compare import train_version

LORA = "loras/geo/geo_v1.safetensors"


def test_the_presets_render_samples_by_default() -> None:
    assert training_params("tiny", {}).num_sample_images == 2
    assert training_params("runwayml/stable-diffusion-v1-5", {}).num_sample_images == 4
    assert training_params("tiny", {"num_sample_images": 0}).num_sample_images == 0


def test_sample_settings_are_not_part_of_a_versions_identity() -> None:
    a = TrainingParams(num_sample_images=0).model_dump(mode="json")
    b = TrainingParams(num_sample_images=4, sample_inference_steps=8).model_dump(mode="json")
    assert a != b and version_identity(a) == version_identity(b)
    assert version_identity(a) != version_identity(TrainingParams(rank=8).model_dump(mode="json"))


def test_missing_samples_names_what_the_settings_ask_for_that_the_version_lacks() -> None:
    trained = {"sample_inference_steps": 20}
    have = {sample_key(LORA, 0, 20, 20), sample_key(LORA, 1, 20, 20)}
    assert sample_key(LORA, 1, 20, 20) == "loras/geo/geo_v1_sample_1.png"
    assert sample_key(LORA, 1, 8, 20) == "loras/geo/geo_v1_sample_1_8steps.png"  # never overwrites the first
    assert missing_samples(have, LORA, trained, TrainingParams(num_sample_images=2)) == []
    assert missing_samples(have, LORA, trained, TrainingParams(num_sample_images=4)) == [2, 3]
    assert missing_samples(have, LORA, trained, TrainingParams(num_sample_images=2, sample_inference_steps=8)) == [0, 1]
    assert missing_samples(set(), LORA, {}, TrainingParams(num_sample_images=1)) == [0]  # an old record: default 20


class RefusingBackend:
    """A training backend that must not be called: no new training may be submitted."""

    def submit(self, request, **kwargs):  # noqa: ANN001, ANN003, ANN201
        raise AssertionError(f"a new job was submitted for {request.version}")


@pytest.mark.slow  # trains one tiny LoRA and renders samples in a subprocess
def test_changing_sample_settings_renders_samples_for_the_existing_version(store, sample_dataset) -> None:
    set_current(store, read_manifest(store, STYLE, sample_dataset))
    train_version(store, sample_dataset, 1, 1e-3)  # trained with no samples (request_dict's params)
    version = RegistryStore(store).read(STYLE)[0].version(1)
    assert version is not None and version.status is VersionStatus.completed and version.samples == ()

    wanted = TrainingParams.model_validate({**version.params, "num_sample_images": 2, "sample_inference_steps": 2})
    submitted = submit_training(store=store, backend=RefusingBackend(), style=STYLE, params=wanted)  # type: ignore[arg-type]
    assert (submitted.version, submitted.reused) == ("V1", True)

    assert render_missing_samples(str(store.root), STYLE, version, wanted) == 2
    after = RegistryStore(store).read(STYLE)[0]
    assert [v.name for v in after.versions] == ["V1"]
    rendered = after.version(1)
    assert rendered is not None and rendered.status is VersionStatus.completed and rendered.file == version.file
    assert [s.key for s in rendered.samples] == [
        "loras/geo/geo_v1_sample_0_2steps.png",
        "loras/geo/geo_v1_sample_1_2steps.png",
    ]
    assert [s.seed for s in rendered.samples] == [7, 8] and all(s.prompt for s in rendered.samples)
    assert all(store.get(s.key).data.startswith(b"\x89PNG") for s in rendered.samples)

    def no_subprocess(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("nothing is missing: nothing to render")

    assert render_missing_samples(str(store.root), STYLE, rendered, wanted, run=no_subprocess) == 0


def test_a_failed_rendering_says_why_in_one_line(store, sample_dataset) -> None:
    from lora_pipeline.registry.models import LoraFile, Version

    version = Version(
        number=3, status=VersionStatus.completed, file=LoraFile("loras/geo/geo_v3.safetensors", 1, "e", 0)
    )

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return subprocess.CompletedProcess(
            args, 2, "", "Traceback …\ngeo V3 is deleted, not completed: it has no LoRA\n"
        )

    with pytest.raises(
        SampleRenderingFailed, match=r"^samples of geo V3 not rendered: geo V3 is deleted, not completed"
    ):
        render_missing_samples(str(store.root), STYLE, version, TrainingParams(num_sample_images=1), run=failing)

    def done(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return subprocess.CompletedProcess(args, 0, json.dumps([{"key": "k"}]) + "\n", "")

    assert render_missing_samples(str(store.root), STYLE, version, TrainingParams(num_sample_images=1), run=done) == 1
