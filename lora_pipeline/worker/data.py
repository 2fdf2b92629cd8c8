"""The training data: a dataset version from the store, decoded, captioned and bucketed.

Fetching and checking happen before the model is loaded, so a dataset with no
images or a corrupt one fails in seconds with the file named, not after minutes
of GPU time. Bucketing and batch order are pure functions of the image sizes and
the seed: the same data and seed give the same batches on every attempt, which is
what makes resumed training equal uninterrupted training.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from lora_pipeline.dataset.manifest import DatasetManifest
from lora_pipeline.dataset.validate import to_rgb
from lora_pipeline.storage.base import ObjectNotFound, ObjectStore
from lora_pipeline.storage.keys import dataset_manifest_key, dataset_prefix
from lora_pipeline.worker.errors import WorkerInputError

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Example:
    """One training image, decoded to RGB with EXIF orientation applied."""

    image: Image.Image
    caption: str
    source: str


def load_manifest(store: ObjectStore, style: str, dataset_hash: str) -> DatasetManifest:
    """The dataset version's manifest; a clear error when it is missing or empty."""
    key = dataset_manifest_key(style, dataset_hash)
    try:
        raw = store.get(key).data
    except ObjectNotFound:
        raise WorkerInputError(
            f"dataset_hash: no dataset {dataset_hash} for style {style!r} in {store.describe()} (missing {key})"
        ) from None
    try:
        manifest = DatasetManifest.model_validate_json(raw)
    except ValueError as exc:
        raise WorkerInputError(f"dataset manifest {key} is invalid: {exc}") from None
    if not manifest.images:
        raise WorkerInputError(f"dataset {key} has no images to train on")
    return manifest


def fetch_examples(store: ObjectStore, manifest: DatasetManifest, style: str, dataset_hash: str) -> list[Example]:
    """Download and decode every image; verify its content hash; refuse corrupt files."""
    prefix = dataset_prefix(style, dataset_hash)
    examples = []
    for entry in manifest.images:
        key = prefix + entry.file
        try:
            data = store.get(key).data
        except ObjectNotFound:
            raise WorkerInputError(f"dataset image {entry.source!r} is missing from the store ({key})") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise WorkerInputError(f"dataset image {entry.source!r} ({key}) does not match its manifest sha256")
        examples.append(Example(decode_image(data, entry.source), entry.caption, entry.source))
    return examples


def decode_image(data: bytes, source: str) -> Image.Image:
    """RGB pixels of an image file, or WorkerInputError naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise WorkerInputError(f"corrupt image {source!r}: {exc}") from None


def with_trigger(caption: str, trigger_word: str | None) -> str:
    """Prefix the trigger word unless the caption already carries it."""
    caption = caption.strip()
    if not trigger_word or trigger_word.lower() in caption.lower():
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """Comma-separated tags and their counts (kohya's ``ss_tag_frequency``)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip() for tag in caption.split(",") if tag.strip())
    return dict(sorted(counts.items()))


def bucket_step(resolution: int) -> int:
    """Pixel granularity of bucket sides: 64 for real models, finer for tiny resolutions."""
    return 64 if resolution >= 256 else 16


def make_buckets(resolution: int, *, max_ratio: float = 2.0) -> list[Size]:
    """Bucket sizes with about ``resolution²`` pixels and aspect ratios up to ``max_ratio``."""
    step = bucket_step(resolution)
    side = max(step, resolution // step * step)
    area = side * side
    buckets = set()
    width = step
    while width <= side * max_ratio:
        height = min(area // width // step * step, int(side * max_ratio) // step * step)
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    buckets.add((side, side))
    return sorted(buckets)


def assign_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def bucket_for(size: Size, resolution: int, enable_bucketing: bool) -> Size:
    if not enable_bucketing:
        side = max(bucket_step(resolution), resolution // bucket_step(resolution) * bucket_step(resolution))
        return (side, side)
    return assign_bucket(size, make_buckets(resolution))


def resize_and_crop(image: Image.Image, bucket: Size) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover the bucket, centre-crop; returns the crop and its top-left (top, left)."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height)), (top, left)


def epoch_batches(buckets: Sequence[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled within each bucket, then batch order shuffled.

    A pure function of its arguments, so any step's batch can be recomputed after a
    restart without saving sampler state.
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict[Size, list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(buckets: Sequence[Size], batch_size: int) -> int:
    counts = Counter(buckets)
    return sum(-(-n // batch_size) for n in counts.values())
