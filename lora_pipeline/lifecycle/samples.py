"""A version's sample images as something a UI shows: a Markdown grid and a table of prompts.

Dagster's UI renders Markdown images only from http(s) URLs or data URIs. A store with a
public (CDN) base URL is linked as it is; anything else (a local store, a private bucket) is
embedded as small PNG thumbnails, within a total budget so the event log stays light.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Sequence

from lora_pipeline.dataset.validate import thumbnail_data_uri as png_data_uri
from lora_pipeline.dataset.validate import thumbnail_png
from lora_pipeline.contracts.training import TrainingParams, missing_samples
from lora_pipeline.registry.models import SampleImage, Version
from lora_pipeline.storage import ObjectStore

RENDER_TIMEOUT_S = 3600.0
THUMBNAIL_PX = 128  # the longer side of an embedded thumbnail
EMBED_BUDGET_BYTES = 512 * 1024  # all data URIs of one grid together
GRID_COLUMNS = 4


def public_image_url(store: ObjectStore, sample: SampleImage) -> str | None:
    """The sample's URL when a browser can load it: the store has a public base URL and the
    recorded URL is http(s). Else None (embed a thumbnail)."""
    url = sample.url or _store_url(store, sample.key)
    if getattr(store, "public_base_url", None) and url and url.startswith(("https://", "http://")):
        return url
    return None


def thumbnail_data_uri(png: bytes, size: int = THUMBNAIL_PX) -> str:
    """A ``data:image/png;base64,…`` URI of ``png`` scaled to ``size`` px on its longer side: down
    as the dataset's thumbnails are, or up (nearest neighbour) for an image smaller than that."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB")
    if max(image.size) < size:  # a tiny model's 32 px sample: scaled up, pixels kept sharp, to be seen
        scale = size // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return png_data_uri(thumbnail_png(image, size))


def image_sources(
    store: ObjectStore, samples: Sequence[SampleImage], *, budget: int = EMBED_BUDGET_BYTES
) -> list[str | None]:
    """Per sample: its public URL, or a thumbnail data URI, or None (unreadable, or over budget)."""
    sources: list[str | None] = []
    spent = 0
    for sample in samples:
        url = public_image_url(store, sample)
        if url is not None:
            sources.append(url)
            continue
        try:
            uri = thumbnail_data_uri(store.get(sample.key).data)
        except Exception:  # noqa: BLE001 - a missing or broken image leaves a gap, not a failed run
            sources.append(None)
            continue
        if spent + len(uri) > budget:
            sources.append(None)
            continue
        spent += len(uri)
        sources.append(uri)
    return sources


def samples_markdown(store: ObjectStore, samples: Sequence[SampleImage], *, columns: int = GRID_COLUMNS) -> str:
    """A grid of every sample image, nothing else: Dagster's UI shows a Markdown entry inline (in
    an asset's Events tab) only under 1,000 characters, which a grid of linked images fits and a
    grid of embedded thumbnails does not (that one opens from "[Show Markdown]"). The prompts
    and seeds go in their own table (``sample_rows``)."""
    if not samples:
        return "No sample images (the request asked for none: `num_sample_images`)."
    sources = image_sources(store, samples)
    cells = [
        f"![sample {i}]({src})" if src else f"(sample {i}: not embedded, see its key)" for i, src in enumerate(sources)
    ]
    width = max(1, min(columns, len(cells)))
    lines = ["| " + " | ".join(f"#{i}" for i in range(width)) + " |", "|" + " --- |" * width]
    for start in range(0, len(cells), width):
        row = cells[start : start + width]
        lines.append("| " + " | ".join(row + [""] * (width - len(row))) + " |")
    return "\n".join(lines)


def sample_rows(samples: Sequence[SampleImage]) -> list[dict[str, str | int | None]]:
    """One row per sample image: its number in the grid, prompt, seed and key."""
    return [
        {"#": i, "prompt": sample.prompt or "", "seed": sample.seed, "key": sample.key}
        for i, sample in enumerate(samples)
    ]


def _store_url(store: ObjectStore, key: str) -> str | None:
    try:
        return store.url(key)
    except ValueError:
        return None


class SampleRenderingFailed(RuntimeError):
    """Rendering an existing version's samples failed; the version itself is unchanged."""


def render_missing_samples(
    storage_url: str,
    style: str,
    version: Version,
    params: TrainingParams,
    *,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> int:
    """Render the samples ``params`` asks for that a completed ``version`` lacks (its sample
    settings are not part of its identity, so a request that changes only them reuses it).

    The rendering loads torch, so it runs in a subprocess (``python -m lora_pipeline.worker.samples``),
    which stores and records the images. Returns how many it rendered (0: nothing was missing).
    """
    main_key = version.s3_key
    if not main_key or not missing_samples({s.key for s in version.samples}, main_key, version.params or {}, params):
        return 0
    done = run(
        [
            sys.executable,
            "-m",
            "lora_pipeline.worker.samples",
            "--storage-url",
            storage_url,
            style,
            version.name,
            "--count",
            str(params.num_sample_images),
            "--steps",
            str(params.sample_inference_steps),
        ],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise SampleRenderingFailed(
            f"samples of {style} {version.name} not rendered: {lines[-1] if lines else f'exit status {done.returncode}'}"
        )
    return len(json.loads(done.stdout.strip().splitlines()[-1]))
