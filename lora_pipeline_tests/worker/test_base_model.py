"""Where the base model comes from: 'tiny', a folder, the object store or a hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.storage.transfer import upload_tree
from lora_pipeline.worker.base_model import describe_source, resolve_base_model
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.family import detect_family


def test_model_in_the_object_store_is_downloaded_into_the_cache(tiny_model: Path, store, tmp_path: Path) -> None:
    upload_tree(store, tiny_model, "models/tiny/")
    folder = resolve_base_model("store:models/tiny", store, cache_dir=tmp_path / "cache")
    assert folder.is_relative_to(tmp_path / "cache")
    assert detect_family(folder) == "sd1"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_store_prefix_without_a_model_is_refused(store, tmp_path: Path) -> None:
    with pytest.raises(WorkerInputError, match="no diffusers model at 'models/none/'"):
        resolve_base_model("store:models/none", store, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("base_model", "source"),
    [("tiny", "tiny"), ("store:models/sd15", "store"), ("stabilityai/stable-diffusion-xl-base-1.0", "hub")],
)
def test_base_model_sources_are_told_apart(base_model: str, source: str) -> None:
    assert describe_source(base_model) == source


@pytest.mark.parametrize("base_model", ["/no/such/folder", "not a model", "store:"])
def test_unusable_base_model_is_refused_naming_the_field(base_model: str) -> None:
    with pytest.raises(WorkerInputError, match="base_model"):
        describe_source(base_model)


def test_local_folder_is_used_in_place(tiny_model: Path) -> None:
    assert resolve_base_model(str(tiny_model), None) == tiny_model
