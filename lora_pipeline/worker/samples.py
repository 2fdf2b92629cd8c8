"""A few images generated with the new LoRA, uploaded beside it, so a person can judge it.

Prompts are the dataset's own captions (with the trigger word) and the seeds are
fixed, so samples of two versions of a style can be compared side by side.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from lora_pipeline.contracts.training import ModelFamily, TrainingParams
from lora_pipeline.registry.models import SampleImage
from lora_pipeline.storage import ObjectStore


def sample_prompts(captions: Sequence[str], count: int) -> list[str]:
    """The first ``count`` captions, cycling when the dataset is smaller."""
    if not captions or count <= 0:
        return []
    return [captions[i % len(captions)] for i in range(count)]


def generate_samples(
    model_dir: Path,
    family: ModelFamily,
    lora_file: Path,
    prompts: Sequence[str],
    params: TrainingParams,
    device: torch.device,
) -> list[bytes]:
    """PNG bytes of one image per prompt, generated with the LoRA loaded."""
    if not prompts:
        return []
    from lora_pipeline.worker.families import family_for

    rules = family_for(family, model_dir)
    from lora_pipeline.worker.train import weight_dtype_for

    dtype = weight_dtype_for(params.mixed_precision, device)
    pipe = rules.sampling_pipeline(dtype)
    pipe.load_lora_weights(str(lora_file))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(params.seed + index)
        image = pipe(
            prompt=prompt,  # by name: FLUX.2 klein's pipeline takes an image first
            num_inference_steps=params.sample_inference_steps,
            height=params.resolution,
            width=params.resolution,
            generator=generator,
            **rules.sample_kwargs(),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def render_version_samples(store: ObjectStore, style: str, version: str, count: int, steps: int) -> list[SampleImage]:
    """Render the sample images ``count``/``steps`` ask for that a completed version lacks, store
    them beside its LoRA and record them (``SamplesRendered``): samples for an existing version,
    no training. Prompts and seeds are the worker's (the dataset's captions with the trigger word,
    ``seed + i``). Returns the new samples; raises ComparisonError for a version without a LoRA."""
    from lora_pipeline.contracts.training import missing_samples, sample_key
    from lora_pipeline.dataset.versions import read_manifest
    from lora_pipeline.registry.evidence import SamplesRendered
    from lora_pipeline.registry_store.documents import RegistryStore
    from lora_pipeline.worker.base_model import resolve_base_model
    from lora_pipeline.worker.compare import comparison_version, lora_header, trained_params
    from lora_pipeline.worker.data import with_trigger
    from lora_pipeline.worker.family import detect_family
    from lora_pipeline.worker.train import pick_device

    record, diffusers_key = comparison_version(store, style, version)
    main_key = record.s3_key or diffusers_key
    with tempfile.TemporaryDirectory(prefix="lora-samples-") as tmp:
        path = Path(tmp) / "lora.safetensors"
        store.download_file(diffusers_key, path)
        header = lora_header(path)
        trained = trained_params(header, record)
        wanted = trained.model_copy(update={"num_sample_images": count, "sample_inference_steps": steps})
        have = {s.key for s in record.samples}
        missing = missing_samples(have, main_key, trained.model_dump(mode="json"), wanted)
        if not missing:
            return []
        captions = (
            [e.caption for e in read_manifest(store, style, record.dataset_hash).images] if record.dataset_hash else []
        )
        prompts = (
            sample_prompts([with_trigger(c, trained.trigger_word) for c in captions], count)
            or [trained.trigger_word or style] * count
        )
        model_dir = resolve_base_model(header.get("lora_pipeline.base_model") or "tiny", store)
        family, device = detect_family(model_dir), pick_device()
        rendered = []
        for index in missing:
            # One call per image, seeded as the worker seeds image ``index``.
            single = wanted.model_copy(update={"seed": trained.seed + index})
            [png] = generate_samples(model_dir, family, path, [prompts[index]], single, device)
            key = sample_key(main_key, index, steps, trained.sample_inference_steps)
            store.put(key, png, content_type="image/png")
            rendered.append(SampleImage(key=key, prompt=prompts[index], seed=trained.seed + index, url=store.url(key)))
    RegistryStore(store).apply(style, [SamplesRendered(style, record.number, tuple(rendered), datetime.now(UTC))])
    return rendered


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lora_pipeline.worker.samples --storage-url URL STYLE VERSION --count N --steps N``:
    the new samples as one JSON list on stdout; a refusal's reason on stderr, exit status 2. The
    ``trained_lora`` asset runs this in a subprocess, so the code location never imports torch."""
    import argparse
    import json
    import sys

    from lora_pipeline.dataset.versions import DatasetNotFound
    from lora_pipeline.settings import get_settings
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.storage.factory import open_store
    from lora_pipeline.worker.compare import ComparisonError

    parser = argparse.ArgumentParser(prog="python -m lora_pipeline.worker.samples")
    parser.add_argument("--storage-url", required=True)
    parser.add_argument("style")
    parser.add_argument("version")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        store = open_store(args.storage_url, settings=get_settings())
        rendered = render_version_samples(store, args.style, args.version, args.count, args.steps)
    except (ComparisonError, DatasetNotFound, StorageError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps([s.to_dict() for s in rendered]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
