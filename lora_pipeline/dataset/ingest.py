"""Ingest: a folder, zip or store prefix in; a validated, versioned dataset in the store out.

Two passes, because the version (the folder images are stored under) is a hash
of every accepted image and caption and is only known once all are checked:

1. **check** — every caption file is read and every image decoded in a thread
   pool (Pillow and hashlib release the GIL), keeping only small facts per file,
   never the image bytes, so memory does not grow with the dataset. Files from a
   zip or a store are staged under their content hash in a temporary folder
   (names from the source never touch the file system).
2. **store** — images the version lacks go up concurrently (the storage layer's
   batch upload, skip-if-present), then the manifest (written last and only
   once: a version with a manifest is complete), then the style's current
   pointer moves (conditional write), unless it already points here.

The same data therefore uploads nothing and leaves the pointer alone; changed
data gives a new version. Every file that does not make it in is in the
report's and the manifest's ``rejected`` list with its reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image

from lora_pipeline.dataset.captions import (
    CaptionError,
    CaptionIndex,
    build_caption_index,
    is_caption_file,
    is_metadata_file,
    stem_key,
)
from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, RejectedFile, dataset_hash
from lora_pipeline.dataset.report import (
    FILLED,
    DatasetStats,
    Note,
    Thumbnail,
    dataset_stats,
    rejected_markdown,
    rejected_rows,
    thumbnails_markdown,
)
from lora_pipeline.dataset.sources import (
    DEFAULT_MAX_FILE_BYTES,
    Listing,
    Source,
    SourceError,
    SourceFile,
    open_source,
)
from lora_pipeline.dataset.validate import (
    IMAGE_EXTENSIONS,
    ImageFacts,
    ImageLimits,
    Rejection,
    inspect_image,
    recheck_known,
    thumbnail_png,
)
from lora_pipeline.dataset.versions import (  # re-exported: the dataset API in one place
    DatasetNotFound,
    current_dataset,
    discover_incoming,
    list_styles,
    read_manifest,
    read_pointer,
    set_current,
)
from lora_pipeline.registry.names import validate_style
from lora_pipeline.storage.base import ObjectStore, PreconditionFailed, StorageError
from lora_pipeline.storage.keys import dataset_manifest_key, dataset_prefix
from lora_pipeline.storage.transfer import TransferProgress, upload_files

__all__ = [
    "DatasetNotFound",
    "EmptyDatasetError",
    "IngestError",
    "IngestOptions",
    "IngestReport",
    "ProgressCallback",
    "SAMPLE_TRIGGER_WORD",
    "SourceError",
    "current_dataset",
    "discover_incoming",
    "ingest_dataset",
    "list_styles",
    "read_manifest",
    "read_pointer",
    "sample_dataset_path",
]

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stage is "check" or "upload"."""


class IngestError(Exception):
    """The ingest could not produce a dataset version; the message says why."""


class EmptyDatasetError(IngestError):
    """No image was accepted; ``report`` still lists every file and its reason."""

    def __init__(self, message: str, report: IngestReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class IngestOptions:
    """How strict an ingest is. The defaults accept the bundled sample.

    ``trigger_word`` fills missing captions (default: the style name) and is
    recorded in the manifest; with ``prepend_trigger_word`` it is also put in
    front of every caption that lacks it (a new dataset version, as the captions
    change); ``missing_captions="reject"`` refuses uncaptioned images instead. ``legacy_caption_encodings`` reads non-UTF-8 captions as
    cp1252/Latin-1 with a note; off, they are rejected.
    """

    trigger_word: str | None = None
    min_side: int = 64
    max_pixels: int = 50_000_000
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    missing_captions: Literal["fill", "reject"] = "fill"
    prepend_trigger_word: bool = False
    legacy_caption_encodings: bool = True
    reduced_jpeg_decode: bool = True
    reuse_checks: bool = True  # files the current version holds (same SHA-256) are not decoded again
    check_workers: int | None = None  # default: CPU count + 2
    upload_concurrency: int = 16
    thumbnails: int = 4
    thumbnail_side: int = 64

    def __post_init__(self) -> None:
        if self.missing_captions not in ("fill", "reject"):
            raise ValueError(f"missing_captions must be 'fill' or 'reject', got {self.missing_captions!r}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1 px, got {self.min_side}")
        if self.trigger_word is not None and not self.trigger_word.strip():
            raise ValueError("trigger_word must not be blank")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.min_side, self.max_pixels, self.reduced_jpeg_decode)


@dataclass
class IngestReport:
    """Everything the CLI prints and the Dagster materialization shows."""

    style: str
    source: str
    dataset_hash: str
    manifest: DatasetManifest | None
    stats: DatasetStats
    new_version: bool = False
    current_changed: bool = False
    previous_hash: str | None = None
    uploaded: int = 0
    skipped: int = 0
    uploaded_bytes: int = 0
    rejected: list[RejectedFile] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    thumbnails: list[Thumbnail] = field(default_factory=list)
    location: str = ""
    seconds: float = 0.0

    def rejected_rows(self) -> list[dict[str, str]]:
        return rejected_rows(self.rejected)

    def rejected_markdown(self) -> str:
        return rejected_markdown(self.rejected)

    def thumbnails_markdown(self) -> str:
        return thumbnails_markdown(self.thumbnails, self.stats.image_count)

    def summary(self) -> str:
        if not self.dataset_hash:
            return f"{self.style}: no images accepted from {self.source} ({len(self.rejected)} files rejected)"
        state = "new version" if self.new_version else "version already stored"
        pointer = "now current" if self.current_changed else "already current"
        return (
            f"{self.style}: dataset {self.dataset_hash[:12]} ({state}, {pointer}); "
            f"{self.stats.image_count} images, {self.stats.total_bytes / 1e6:.2f} MB; "
            f"uploaded {self.uploaded}, already there {self.skipped}; "
            f"{len(self.rejected)} rejected; captions {self.stats.caption_coverage:.0%} own"
        )

    def dagster_metadata(self) -> dict[str, Any]:
        """Materialization metadata: counts, size, resolutions, thumbnails, the rejected table.

        Dagster is imported here only, so the dataset package stays usable
        without it (the worker and the CLI never call this).
        """
        import dagster as dg

        stats = self.stats
        metadata: dict[str, Any] = {
            "dataset_hash": dg.MetadataValue.text(self.dataset_hash),
            "images": dg.MetadataValue.int(stats.image_count),
            "rejected": dg.MetadataValue.int(len(self.rejected)),
            "total_mb": dg.MetadataValue.float(round(stats.total_bytes / 1e6, 3)),
            "caption_coverage": dg.MetadataValue.float(round(stats.caption_coverage, 4)),
            "filled_captions": dg.MetadataValue.int(stats.filled_captions),
            "uploaded": dg.MetadataValue.int(self.uploaded),
            "already_stored": dg.MetadataValue.int(self.skipped),
            "new_version": dg.MetadataValue.bool(self.new_version),
            "current_changed": dg.MetadataValue.bool(self.current_changed),
            "shortest_side_px": _count_table(dg, "shortest side (px)", stats.side_buckets),
            "resolutions": _count_table(dg, "resolution", stats.top_resolutions),
            "formats": _count_table(dg, "format", stats.formats),
            "thumbnails": dg.MetadataValue.md(self.thumbnails_markdown()),
            "rejected_files": dg.MetadataValue.table(
                records=[dg.TableRecord(row) for row in self.rejected_rows()],
                schema=dg.TableSchema(columns=[dg.TableColumn("file", "string"), dg.TableColumn("reason", "string")]),
            ),
            "source": dg.MetadataValue.text(self.source),
            "location": dg.MetadataValue.text(self.location),
        }
        if self.notes:
            metadata["notes"] = dg.MetadataValue.md("\n".join(f"- `{n.source}`: {n.message}" for n in self.notes[:200]))
        return metadata

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (thumbnails as data URIs), for ``--json`` and metadata."""
        return {
            "style": self.style,
            "source": self.source,
            "datasetHash": self.dataset_hash,
            "location": self.location,
            "newVersion": self.new_version,
            "currentChanged": self.current_changed,
            "previousHash": self.previous_hash,
            "uploaded": self.uploaded,
            "skipped": self.skipped,
            "uploadedBytes": self.uploaded_bytes,
            "stats": self.stats.to_dict(),
            "rejected": self.rejected_rows(),
            "notes": [{"file": n.source, "note": n.message} for n in self.notes],
            "thumbnails": [{"file": t.source, "dataUri": t.data_uri} for t in self.thumbnails],
            "seconds": round(self.seconds, 3),
        }


SAMPLE_TRIGGER_WORD = "geoshapes style"
"""The word every caption of the bundled sample starts with (scripts/make_sample_data.py)."""


def sample_dataset_path() -> Path:
    """The bundled sample style (8 small drawn images with captions), for demos and tests.

    Ingest it with ``IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)``.
    """
    return Path(__file__).resolve().parents[1] / "sample_data" / "sample_style"


def ingest_dataset(
    store: ObjectStore,
    style: str,
    source: str | os.PathLike[str],
    *,
    options: IngestOptions = IngestOptions(),
    progress: ProgressCallback | None = None,
) -> IngestReport:
    """Check, version and store ``source`` as ``style``'s current dataset.

    ``source``: a folder, a .zip, ``store:<prefix>`` (a prefix of ``store``) or
    an ``s3://``/``file://`` URL. Raises InvalidStyleName, SourceError (source
    unreadable as a whole), EmptyDatasetError (nothing accepted; carries the
    report) or StorageError (uploads failed; nothing was made current).
    """
    started = time.perf_counter()
    validate_style(style)
    trigger_word = (options.trigger_word or style).strip()
    opened = open_source(source, store=store, max_file_bytes=options.max_file_bytes)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-ingest-") as staging:
            known = _current_images(store, style) if options.reuse_checks else {}
            checked = _check_source(opened, options, trigger_word, Path(staging), progress, known)
            if not checked.entries:
                report = _report(style, opened.description, checked, manifest=None, started=started)
                raise EmptyDatasetError(_nothing_accepted(opened.description, checked.rejected), report)
            manifest = DatasetManifest(
                style=style,
                dataset_hash=dataset_hash(checked.entries),
                created_at=datetime.now(UTC).isoformat(),
                trigger_word=trigger_word,
                images=checked.entries,
                rejected=checked.rejected,
                source=opened.description,
            )
            stored, new_version, uploaded, skipped, uploaded_bytes = _store_version(
                store, manifest, checked.paths, options, progress
            )
    finally:
        opened.close()
    changed, previous = set_current(store, stored)
    report = _report(style, opened.description, checked, manifest=stored, started=started)
    report.new_version = new_version
    report.current_changed = changed
    report.previous_hash = previous
    report.uploaded, report.skipped, report.uploaded_bytes = uploaded, skipped, uploaded_bytes
    report.location = store.describe().rstrip("/") + "/" + dataset_prefix(style, stored.dataset_hash)
    return report


def stored_version_report(
    store: ObjectStore, style: str, options: IngestOptions = IngestOptions()
) -> IngestReport | None:
    """The report of ``style``'s current stored dataset version, re-read from the store (None when
    it has none): what materializing a style added with ``lora-pipeline dataset add`` records, with
    no new source to ingest. Nothing is uploaded and the current version stays as it is."""
    started = time.perf_counter()
    manifest = current_dataset(store, style)
    if manifest is None:
        return None
    prefix = dataset_prefix(style, manifest.dataset_hash)
    thumbnails = []
    for entry in manifest.images[: options.thumbnails]:
        try:
            with Image.open(io.BytesIO(store.get(prefix + entry.file).data)) as image:
                thumbnails.append(Thumbnail(entry.source, thumbnail_png(image.convert("RGB"), options.thumbnail_side)))
        except (StorageError, OSError):  # a missing or broken image shows no thumbnail, the report stands
            continue
    return IngestReport(
        style=style,
        source=f"the stored version {manifest.dataset_hash[:12]} (from {manifest.source or 'an earlier ingest'})",
        dataset_hash=manifest.dataset_hash,
        manifest=manifest,
        stats=dataset_stats(manifest.images),
        rejected=list(manifest.rejected),
        thumbnails=thumbnails,
        location=store.describe().rstrip("/") + "/" + prefix,
        seconds=time.perf_counter() - started,
    )


# -- pass 1: check ------------------------------------------------------------------


@dataclass
class _Checked:
    entries: list[ImageEntry] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # entry.file → local file to upload
    rejected: list[RejectedFile] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    thumbnails: list[Thumbnail] = field(default_factory=list)


def _check_source(
    source: Source,
    options: IngestOptions,
    trigger_word: str,
    staging: Path,
    progress: ProgressCallback | None,
    known: dict[str, ImageEntry] | None = None,
) -> _Checked:
    """Pass 1: sort the listing, read the captions, check every image, decide what enters.

    One thread pool serves both reads; the rejected list keeps the order a user reads
    it in: the listing's refusals, unreadable captions, images, then caption problems.
    """
    known = known or {}
    files = _sort_listing(source.listing())
    workers = options.check_workers or (os.cpu_count() or 2) + 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest-check") as pool:
        captions, caption_names, unreadable = _read_captions(source, files, options, pool)
        outcomes = _check_images(source, files.images, options, staging, known, progress, pool)
    checked = _accept_images(outcomes, captions, options, trigger_word, rejected=files.rejected + unreadable)
    checked.rejected.extend(RejectedFile(source=p.name, reason=p.reason) for p in captions.problems)
    checked.rejected.extend(_unused_captions(captions, caption_names, [i.name for i in files.images]))
    return checked


@dataclass
class _SortedListing:
    """A source's files by what they are to a dataset."""

    images: list[SourceFile] = field(default_factory=list)
    caption_names: list[str] = field(default_factory=list)
    metadata_names: list[str] = field(default_factory=list)
    rejected: list[RejectedFile] = field(default_factory=list)  # refused by the source, or of no use


def _sort_listing(listing: Listing) -> _SortedListing:
    """Images, caption files and metadata files by name; anything else is rejected naming the
    extensions an image needs, so a ``.webp`` or a stray document is explained, not dropped."""
    files = _SortedListing(rejected=[RejectedFile(source=r.name, reason=r.reason) for r in listing.refused])
    for item in listing.files:
        if is_metadata_file(item.name):
            files.metadata_names.append(item.name)
        elif is_caption_file(item.name):
            files.caption_names.append(item.name)
        elif PurePosixPath(item.name).suffix.lower() in IMAGE_EXTENSIONS:
            files.images.append(item)
        else:
            suffix = PurePosixPath(item.name).suffix or "(none)"
            files.rejected.append(
                RejectedFile(
                    source=item.name,
                    reason=f"not an image, caption or metadata file (extension {suffix}); "
                    f"images need one of {', '.join(sorted(IMAGE_EXTENSIONS))}",
                )
            )
    return files


def _read_captions(
    source: Source, files: _SortedListing, options: IngestOptions, pool: ThreadPoolExecutor
) -> tuple[CaptionIndex, list[str], list[RejectedFile]]:
    """The caption index of every caption and metadata file that could be read.

    Returns (index, the caption files read, the files that could not be read). The
    text is dropped once indexed: only the captions stay in memory.
    """
    text_files: dict[str, bytes] = {}
    unreadable: list[RejectedFile] = []
    text_names = files.caption_names + files.metadata_names
    for name, data in zip(text_names, pool.map(lambda n: _read(source, n), text_names), strict=True):
        if isinstance(data, bytes):
            text_files[name] = data
        else:
            unreadable.append(RejectedFile(source=name, reason=data.reason))
    caption_names = [n for n in files.caption_names if n in text_files]
    captions = build_caption_index(
        {n: text_files[n] for n in caption_names},
        {n: text_files[n] for n in files.metadata_names if n in text_files},
        allow_legacy_encodings=options.legacy_caption_encodings,
    )
    return captions, caption_names, unreadable


def _check_images(
    source: Source,
    images: list[SourceFile],
    options: IngestOptions,
    staging: Path,
    known: dict[str, ImageEntry],
    progress: ProgressCallback | None,
    pool: ThreadPoolExecutor,
) -> list[tuple[str, ImageFacts | Rejection, Path | None]]:
    """Every image checked in ``pool``, outcomes in listing order.

    The first ``3 × thumbnails`` images render a thumbnail: enough that some are left
    for the report after rejections, without rendering one per image.
    """
    thumbnail_budget = options.thumbnails * 3
    total = len(images)

    def check(indexed: tuple[int, SourceFile]) -> tuple[str, ImageFacts | Rejection, Path | None]:
        index, item = indexed
        return _check_image(source, item, options, staging, known, thumbnail=index < thumbnail_budget)

    outcomes = []
    for done, outcome in enumerate(pool.map(check, enumerate(images)), start=1):
        outcomes.append(outcome)
        if progress is not None:
            progress("check", done, total)
    return outcomes


def _accept_images(
    outcomes: list[tuple[str, ImageFacts | Rejection, Path | None]],
    captions: CaptionIndex,
    options: IngestOptions,
    trigger_word: str,
    *,
    rejected: list[RejectedFile],
) -> _Checked:
    """The dataset's entries, from checked images in listing order; ``rejected`` grows.

    An image stays out with its reason when it failed its check, repeats an earlier
    image's exact content (the first is kept: a duplicate would weigh double in
    training), or has an unusable caption.
    """
    checked = _Checked()
    checked.rejected = rejected
    seen: dict[str, str] = {}
    for name, outcome, path in outcomes:
        if isinstance(outcome, Rejection):
            checked.rejected.append(RejectedFile(source=name, reason=outcome.reason))
            continue
        if outcome.sha256 in seen:
            checked.rejected.append(
                RejectedFile(source=name, reason=f"exact duplicate of {seen[outcome.sha256]} (same content); kept once")
            )
            continue
        entry = _entry(name, outcome, captions, options, trigger_word)
        if isinstance(entry, Rejection):
            checked.rejected.append(RejectedFile(source=name, reason=entry.reason))
            continue
        seen[outcome.sha256] = name
        checked.entries.append(entry)
        assert path is not None  # _check_image gives every accepted image its local file
        checked.paths[entry.file] = path
        if entry.note:
            checked.notes.append(Note(name, entry.note))
        if outcome.thumbnail_png and len(checked.thumbnails) < options.thumbnails:
            checked.thumbnails.append(Thumbnail(name, outcome.thumbnail_png))
    return checked


def _check_image(
    source: Source,
    item: SourceFile,
    options: IngestOptions,
    staging: Path,
    known: dict[str, ImageEntry],
    *,
    thumbnail: bool,
) -> tuple[str, ImageFacts | Rejection, Path | None]:
    """Read, inspect and (for non-local sources) stage one image; only facts come back.

    ``known``: images of the style's current version by SHA-256, accepted then,
    so they are not decoded again (see validate.recheck_known).
    """
    data = _read(source, item.name)
    if isinstance(data, Rejection):
        return item.name, data, None
    before = known.get(hashlib.sha256(data).hexdigest()) if data and not thumbnail else None
    if before is not None:
        facts = recheck_known(
            name=item.name,
            sha256=before.sha256,
            size=before.size,
            width=before.width,
            height=before.height,
            extension=before.file.rsplit(".", 1)[-1],
            limits=options.limits,
        )
    else:
        facts = inspect_image(
            data,
            name=item.name,
            limits=options.limits,
            thumbnail_side=options.thumbnail_side if thumbnail else None,
        )
    if isinstance(facts, Rejection):
        return item.name, facts, None
    path = source.local_path(item.name)
    if path is None:
        path = staging / f"{facts.sha256}.{facts.extension}"
        if not path.exists():
            partial = path.with_name(path.name + f".{os.getpid()}.{id(data)}.part")
            partial.write_bytes(data)
            os.replace(partial, path)
    return item.name, facts, path


def _current_images(store: ObjectStore, style: str) -> dict[str, ImageEntry]:
    """The current version's images by SHA-256 (empty when there is none or it is unreadable)."""
    try:
        previous = current_dataset(store, style)
    except (DatasetNotFound, ValueError):
        return {}
    return {e.sha256: e for e in previous.images} if previous else {}


def _read(source: Source, name: str) -> bytes | Rejection:
    try:
        return source.read(name)
    except (OSError, SourceError, StorageError) as exc:
        return Rejection(f"cannot read: {exc}")


def _entry(
    name: str,
    facts: ImageFacts,
    captions: CaptionIndex,
    options: IngestOptions,
    trigger_word: str,
) -> ImageEntry | Rejection:
    notes = [facts.note] if facts.note else []
    found = captions.lookup(name)
    if isinstance(found, CaptionError):
        return Rejection(f"caption unusable: {found}")
    if found is not None and found.text:
        text, origin = found.text, found.origin
        if found.note:
            notes.append(found.note)
        if options.prepend_trigger_word and trigger_word.lower() not in text.lower():
            text = f"{trigger_word}, {text}"
    elif options.missing_captions == "reject":
        what = "empty caption" if found is not None else "no caption (.txt beside it, metadata.jsonl or captions.csv)"
        return Rejection(f"{what}, and missing captions are set to reject")
    else:
        text, origin = trigger_word, FILLED
        notes.append("no caption" if found is None else "empty caption")
        notes[-1] += f"; filled with the trigger word {trigger_word!r}"
    return ImageEntry(
        file=f"images/{facts.sha256}.{facts.extension}",
        sha256=facts.sha256,
        width=facts.width,
        height=facts.height,
        size=facts.size,
        caption=text,
        source=name,
        caption_source=origin,
        note="; ".join(notes) or None,
    )


def _unused_captions(captions: CaptionIndex, caption_names: list[str], image_names: list[str]) -> list[RejectedFile]:
    """Caption files and metadata rows that name no image: probably a typo worth seeing."""
    image_stems = {stem_key(n) for n in image_names}
    images = set(image_names)
    unused = [
        RejectedFile(source=n, reason="caption file with no image of the same name")
        for n in caption_names
        if stem_key(n) not in image_stems
    ]
    unused += [
        RejectedFile(source=n, reason="captions row names an image that is not in the source")
        for n in sorted(captions.rows)
        if n not in images
    ]
    return unused


# -- pass 2: store --------------------------------------------------------------------


def _store_version(
    store: ObjectStore,
    manifest: DatasetManifest,
    paths: dict[str, Path],
    options: IngestOptions,
    progress: ProgressCallback | None,
) -> tuple[DatasetManifest, bool, int, int, int]:
    """Upload what the version lacks, then its manifest; returns (manifest, new, up, skipped, bytes)."""
    style, digest = manifest.style, manifest.dataset_hash
    if store.head(dataset_manifest_key(style, digest)) is not None:
        # A manifest is written last, so its version is complete: nothing to send.
        return read_manifest(store, style, digest), False, 0, len(manifest.images), 0
    prefix = dataset_prefix(style, digest)
    total = len(paths)

    def on_progress(event: TransferProgress) -> None:
        if progress is not None:
            progress("upload", event.files_done, total)

    transfer = upload_files(
        store,
        [(prefix + file, path) for file, path in sorted(paths.items())],
        concurrency=options.upload_concurrency,
        progress=on_progress,
    )
    transfer.raise_for_failures()
    try:
        store.put(
            dataset_manifest_key(style, digest), manifest.to_json(), if_none_match=True, content_type="application/json"
        )
        new = True
    except PreconditionFailed:
        manifest, new = read_manifest(store, style, digest), False  # a concurrent ingest of the same data won
    return manifest, new, len(transfer.transferred), len(transfer.skipped), transfer.bytes_transferred


def _nothing_accepted(description: str, rejected: list[RejectedFile], shown: int = 5) -> str:
    if not rejected:
        return f"no usable images in {description} (it holds no files)"
    reasons = "; ".join(f"{r.source}: {r.reason}" for r in rejected[:shown])
    more = f"; and {len(rejected) - shown} more" if len(rejected) > shown else ""
    files = "1 file" if len(rejected) == 1 else f"{len(rejected)} files"
    return f"no usable images in {description} ({files} rejected: {reasons}{more})"


def _report(
    style: str, source: str, checked: _Checked, *, manifest: DatasetManifest | None, started: float
) -> IngestReport:
    return IngestReport(
        style=style,
        source=source,
        dataset_hash=manifest.dataset_hash if manifest else "",
        manifest=manifest,
        stats=dataset_stats(checked.entries),
        rejected=checked.rejected,
        notes=checked.notes,
        thumbnails=checked.thumbnails,
        seconds=time.perf_counter() - started,
    )


def _count_table(dg: Any, what: str, counts: dict[str, int]) -> Any:
    """A breakdown as a two-column table (``dg``: the dagster module, imported by the caller)."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({what: key, "images": n}) for key, n in counts.items()],
        schema=dg.TableSchema(columns=[dg.TableColumn(what, "string"), dg.TableColumn("images", "int")]),
    )
