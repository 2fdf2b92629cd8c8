"""Worker fixtures: the tiny base model (built once per session) and datasets in a local store."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from PIL import Image

from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.dataset.ingest import sample_dataset_path
from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, dataset_hash
from lora_pipeline.storage.keys import dataset_manifest_key, dataset_prefix
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.worker.train import TrainOutcome

STYLE = "geo"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-pipeline-cache")


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path) -> Path:
    from lora_pipeline.worker.tiny_model import TINY_MODEL_VERSION, ensure_tiny_model

    return ensure_tiny_model(model_cache / f"tiny-sd1-v{TINY_MODEL_VERSION}")


@pytest.fixture(autouse=True)
def _worker_cache(_hermetic_env, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'tiny' in a request resolves to the session's model, never ~/.cache."""
    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(model_cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the handler.py subprocesses, as below


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The tiny model's ops are too small to gain from threads, and on a shared machine
    OpenMP threads that spin-wait for a busy core make each op many times slower."""
    import torch

    torch.set_num_threads(1)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (48, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_images() -> list[tuple[str, bytes, str]]:
    """The bundled sample dataset as (name, bytes, caption)."""
    images = []
    for path in sorted(sample_dataset_path().iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            images.append((path.name, path.read_bytes(), path.with_suffix(".txt").read_text().strip()))
    return images


def put_dataset(store: LocalStore, files: Sequence[tuple[str, bytes, str]], style: str = STYLE) -> str:
    """Write a dataset version the way ingest lays it out; returns its hash.

    Bytes are stored as given (no validation), so tests can plant corrupt images.
    """
    entries = []
    for name, data, caption in files:
        sha = hashlib.sha256(data).hexdigest()
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except Exception:  # noqa: BLE001 - corrupt on purpose
            width = height = 1
        entries.append(
            ImageEntry(
                file=f"images/{sha}{Path(name).suffix}",
                sha256=sha,
                width=width,
                height=height,
                size=len(data),
                caption=caption,
                source=name,
            )
        )
    digest = dataset_hash(entries) if entries else "0" * 64
    for entry, (_, data, _) in zip(entries, files, strict=True):
        store.put(dataset_prefix(style, digest) + entry.file, data)
    manifest = DatasetManifest(
        style=style, dataset_hash=digest, created_at=datetime.now(UTC).isoformat(), images=entries
    )
    store.put(dataset_manifest_key(style, digest), manifest.to_json())
    return digest


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def sample_dataset(store: LocalStore) -> str:
    return put_dataset(store, sample_images())


def quick_params(**overrides) -> TrainingParams:
    """Seconds on a 2-core CPU: tiny resolution, few steps."""
    values = dict(rank=4, resolution=32, max_train_steps=8, train_batch_size=2, learning_rate=1e-3, seed=7)
    values.update(overrides)
    return TrainingParams(**values)


def request_dict(store: LocalStore, digest: str, **overrides) -> dict:
    params = overrides.pop("params", {})
    base = dict(rank=4, resolution=32, max_train_steps=8, train_batch_size=2, learning_rate=1e-3, seed=7)
    base.update(params)
    values = dict(
        style=STYLE,
        version="V1",
        dataset_hash=digest,
        base_model="tiny",
        params=base,
        storage_url=str(store.root),
        request_id="req-1",
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def tiny_sdxl_model(model_cache: Path) -> Path:
    """SDXL-shaped (two text encoders, text_time conditioning) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-sdxl", model_cache)


@pytest.fixture(scope="session")
def tiny_flux1_model(model_cache: Path) -> Path:
    """FLUX.1-dev-shaped (guidance embedding, CLIP + T5, packed latents) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-flux1", model_cache)


@pytest.fixture(scope="session")
def tiny_sd3_model(model_cache: Path) -> Path:
    """SD3-shaped (MMDiT, two CLIPs + T5) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-sd3", model_cache)


@pytest.fixture(scope="session")
def tiny_qwen_image_model(model_cache: Path) -> Path:
    """Qwen-Image-shaped (MMDiT, Qwen2.5-VL text model, one-frame video VAE) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-qwen-image", model_cache)


@pytest.fixture(scope="session")
def tiny_z_image_model(model_cache: Path) -> Path:
    """Z-Image-shaped (single-stream DiT, Qwen3 captions) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-z-image", model_cache)


@pytest.fixture(scope="session")
def tiny_flux2_klein_model(model_cache: Path) -> Path:
    """FLUX.2-klein-4B-base-shaped (Qwen3, batch-norm latents patchified 2×2) at tiny sizes."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    return ensure_named_tiny_model("tiny-flux2-klein", model_cache)


class TrainedFiles(NamedTuple):
    """A LoRA trained on a tiny model and written in both layouts, as the handler writes them."""

    outcome: TrainOutcome
    diffusers_file: Path
    kohya_file: Path


def train_and_write(
    model: Path, family: str, variant: str, folder: Path, *, dataset_hash: str = "ab" * 32, **params: Any
) -> TrainedFiles:
    """Train ``family``'s LoRA on ``model`` (the sample images, ``quick_params`` with ``params``),
    then write the diffusers file and the kohya file with a truthful header, into ``folder``."""
    from lora_pipeline.worker.artifact import ArtifactFacts, provenance_metadata, write_kohya_file, write_lora_file
    from lora_pipeline.worker.data import Example, decode_image
    from lora_pipeline.worker.family import denoiser_config
    from lora_pipeline.worker.train import train_lora

    examples = [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]
    training = quick_params(**params)
    outcome = train_lora(training, family, model, examples)  # type: ignore[arg-type]
    now = datetime(2026, 1, 2, tzinfo=UTC)
    facts = ArtifactFacts(
        style="geo", version="V2", job_id="job-1", request_id="req-1", dataset_hash=dataset_hash,
        base_model=f"tiny-{family}", family=family, params=training, steps=outcome.steps,  # type: ignore[arg-type]
        num_train_images=len(examples), tag_frequency={"geoshapes style": 1}, training_seconds=1.0,
        started_at=now, finished_at=now, final_loss=outcome.final_loss, prediction_type="flow", variant=variant,
        quantize_base=outcome.quantize_base, gradient_checkpointing=outcome.gradient_checkpointing,
        mixed_precision=outcome.mixed_precision, memory_plan=outcome.memory_plan,
    )  # fmt: skip
    diffusers_file = write_lora_file(
        folder / "geo_v2.safetensors",
        family,  # type: ignore[arg-type]
        outcome.denoiser_lora,
        provenance_metadata(facts),
        text_encoder_lora=outcome.text_encoder_lora,
        text_encoder_2_lora=outcome.text_encoder_2_lora,
        adapter_configs=outcome.adapter_configs,
    )
    kohya_file = write_kohya_file(
        diffusers_file, folder / "geo_v2_kohya.safetensors", denoiser_config=denoiser_config(model)
    )
    return TrainedFiles(outcome, diffusers_file, kohya_file)
