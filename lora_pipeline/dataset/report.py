"""What an ingest tells its user: statistics, thumbnails, rejected files, and checks.

Pure functions over a manifest (plus the few facts only ingest knows, such as
upload counts), shaped for the Dagster layer: plain dicts and Markdown it can
wrap in ``MetadataValue`` without knowing how a dataset is built.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, RejectedFile
from lora_pipeline.dataset.validate import thumbnail_data_uri

# Shortest-side buckets (px): what matters for training resolution (512 for SD1, 1024 for SDXL).
SIDE_BUCKETS: tuple[tuple[int, str], ...] = (
    (256, "<256"),
    (512, "256–511"),
    (768, "512–767"),
    (1024, "768–1023"),
    (2048, "1024–2047"),
)
TOP_RESOLUTIONS = 10
FILLED = "trigger_word"


@dataclass(frozen=True)
class Note:
    """An accepted file with something worth knowing (re-encoded caption, wrong extension…)."""

    source: str
    message: str


@dataclass(frozen=True)
class Thumbnail:
    source: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return thumbnail_data_uri(self.png)


@dataclass(frozen=True)
class DatasetStats:
    image_count: int
    total_bytes: int
    side_buckets: dict[str, int]
    top_resolutions: dict[str, int]
    formats: dict[str, int]
    min_side: int
    max_side: int
    captioned: int
    filled_captions: int
    caption_coverage: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_stats(images: list[ImageEntry]) -> DatasetStats:
    sides = Counter(_side_bucket(min(e.width, e.height)) for e in images)
    resolutions = Counter(f"{e.width}x{e.height}" for e in images)
    formats = Counter(e.file.rsplit(".", 1)[-1].lower() for e in images)
    filled = sum(1 for e in images if e.caption_source == FILLED)
    captioned = len(images) - filled
    return DatasetStats(
        image_count=len(images),
        total_bytes=sum(e.size for e in images),
        side_buckets={label: sides[label] for _, label in _ALL_BUCKETS if sides[label]},
        top_resolutions=dict(resolutions.most_common(TOP_RESOLUTIONS)),
        formats=dict(sorted(formats.items())),
        min_side=min((min(e.width, e.height) for e in images), default=0),
        max_side=max((max(e.width, e.height) for e in images), default=0),
        captioned=captioned,
        filled_captions=filled,
        caption_coverage=(captioned / len(images)) if images else 0.0,
    )


_ALL_BUCKETS = SIDE_BUCKETS + ((10**9, "≥2048"),)


def _side_bucket(side: int) -> str:
    return next(label for limit, label in _ALL_BUCKETS if side < limit)


# -- asset checks -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, ready to become a Dagster AssetCheckResult."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


MIN_IMAGES = 4  # the enough_images check's minimum; dataset add warns below it


def check_min_images(manifest: DatasetManifest, n: int = MIN_IMAGES) -> CheckOutcome:
    """Too few images make a LoRA that memorises instead of learning a style."""
    count = len(manifest.images)
    passed = count >= n
    verdict = "at least" if passed else "fewer than the required"
    return CheckOutcome(
        passed,
        f"{count} accepted images, {verdict} {n}",
        {"image_count": count, "required": n, "rejected": len(manifest.rejected)},
    )


def check_caption_coverage(manifest: DatasetManifest, min_ratio: float) -> CheckOutcome:
    """Share of images with their own caption (not just the filled-in trigger word)."""
    stats = dataset_stats(manifest.images)
    passed = bool(manifest.images) and stats.caption_coverage >= min_ratio
    return CheckOutcome(
        passed,
        f"{stats.captioned} of {stats.image_count} images have their own caption "
        f"({stats.caption_coverage:.0%}; required {min_ratio:.0%})",
        {
            "caption_coverage": round(stats.caption_coverage, 4),
            "required": min_ratio,
            "filled_from_trigger_word": stats.filled_captions,
        },
    )


# -- presentation -------------------------------------------------------------------


def rejected_rows(rejected: list[RejectedFile]) -> list[dict[str, str]]:
    """Rows for a table (Dagster TableMetadata or the CLI): file and reason."""
    return [{"file": r.source, "reason": r.reason} for r in rejected]


def rejected_markdown(rejected: list[RejectedFile], limit: int = 200) -> str:
    if not rejected:
        return "No files rejected."
    lines = ["| file | reason |", "|---|---|"]
    lines += [f"| `{_md(r.source)}` | {_md(r.reason)} |" for r in rejected[:limit]]
    if len(rejected) > limit:
        lines.append(f"| … | {len(rejected) - limit} more (see the manifest) |")
    return "\n".join(lines)


def thumbnails_markdown(thumbnails: list[Thumbnail], total: int | None = None) -> str:
    """The thumbnails inline, then how many of the version's ``total`` images they are (a few
    are shown, never every image: the event log stays light)."""
    if not thumbnails:
        return "(no thumbnails)"
    images = " ".join(f"![{_md(t.source)}]({t.data_uri})" for t in thumbnails)
    if total is None or total <= len(thumbnails):
        return images
    return f"{images}\n\n{len(thumbnails)} of {total} images shown (`lora-pipeline dataset show` lists every one)."


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
