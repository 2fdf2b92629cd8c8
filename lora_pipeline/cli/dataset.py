"""``lora-pipeline dataset``: add a style's training data, list styles, show a dataset.

Storage is the configured store (LORA_STORAGE_URL). Adding is all it takes to
register a style: the Dagster layer makes its partitions from the styles with a
stored dataset, so no second step is needed.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Literal

import click

from lora_pipeline.dataset.ingest import (
    EmptyDatasetError,
    IngestError,
    IngestOptions,
    IngestReport,
    SourceError,
    current_dataset,
    ingest_dataset,
    list_styles,
    read_manifest,
    read_pointer,
)
from lora_pipeline.dataset.report import MIN_IMAGES, dataset_stats
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.storage.base import ObjectStore, StorageError


def _store() -> ObjectStore:
    from lora_pipeline.settings import SettingsError
    from lora_pipeline.storage.factory import open_configured_store

    try:
        return open_configured_store()
    except (SettingsError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None


def _style(value: str) -> str:
    try:
        return validate_style(value)
    except InvalidStyleName as exc:
        raise click.BadParameter(str(exc), param_hint="STYLE") from None


@click.group()
def dataset() -> None:
    """Training datasets: validate, version and store a style's images and captions."""


@dataset.command("add")
@click.argument("style")
@click.argument("source")
@click.option(
    "--trigger-word", help="Caption for images without one (default: the style name); recorded in the manifest."
)
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=IngestOptions.min_side,
    show_default=True,
    help="Reject images whose shortest side is smaller (px).",
)
@click.option(
    "--missing-captions",
    type=click.Choice(["fill", "reject"]),
    default="fill",
    show_default=True,
    help="Fill missing/empty captions with the trigger word, or reject those images.",
)
@click.option("--prepend-trigger-word", is_flag=True, help="Put the trigger word in front of captions that lack it.")
@click.option(
    "--strict-encoding",
    is_flag=True,
    help="Reject captions that are not UTF-8/UTF-16 instead of reading them as cp1252.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=IngestOptions.upload_concurrency,
    show_default=True,
    help="Uploads in flight.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the ingest report as JSON.")
def add(
    style: str,
    source: str,
    trigger_word: str | None,
    min_side: int,
    missing_captions: Literal["fill", "reject"],  # click.Choice above
    prepend_trigger_word: bool,
    strict_encoding: bool,
    concurrency: int,
    as_json: bool,
) -> None:
    """Ingest SOURCE as STYLE's current dataset.

    SOURCE is a folder, a .zip, 'store:<prefix>' (e.g. store:incoming/STYLE/)
    or an s3:// URL; captions are same-named .txt files, a metadata.jsonl or a
    captions.csv. Every rejected file is listed with its reason.
    """
    style = _style(style)
    try:
        options = IngestOptions(
            trigger_word=trigger_word,
            min_side=min_side,
            missing_captions=missing_captions,
            prepend_trigger_word=prepend_trigger_word,
            legacy_caption_encodings=not strict_encoding,
            upload_concurrency=concurrency,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    store = _store()
    with _Bars(enabled=not as_json) as bars:
        try:
            report = ingest_dataset(store, style, source, options=options, progress=bars)
        except EmptyDatasetError as exc:
            bars.close()
            if as_json:
                click.echo(json.dumps({"error": str(exc), **exc.report.to_dict()}, indent=2))
                raise click.ClickException(str(exc)) from None
            _print_rejected(exc.report)  # every file and its reason, once
            listed = f"{len(exc.report.rejected)} file(s) rejected, listed above" if exc.report.rejected else None
            raise click.ClickException(
                f"no usable images in {exc.report.source} ({listed})" if listed else str(exc)
            ) from None
        except (SourceError, IngestError, StorageError) as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(report.summary())
    click.echo(f"stored at {report.location}")
    for note in report.notes:
        click.echo(f"note: {note.source}: {note.message}")
    _print_rejected(report)
    if report.stats.image_count < MIN_IMAGES:
        click.echo(
            f"warning: only {report.stats.image_count} image(s) accepted; the enough_images check wants at "
            f"least {MIN_IMAGES} (a LoRA trained on fewer memorises its images instead of learning a style)",
            err=True,
        )
    click.echo(
        f"style {style!r} is registered: the Dagster layer picks it up from the stored datasets "
        "(no further step needed)."
    )


@dataset.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_command(as_json: bool) -> None:
    """Styles with a stored dataset and their current version."""
    store = _store()
    rows: list[dict[str, Any]] = []
    for style in list_styles(store):
        pointer, _ = read_pointer(store, style)
        if pointer is not None:
            rows.append(
                {
                    "style": style,
                    "datasetHash": pointer.dataset_hash,
                    "images": pointer.image_count,
                    "updatedAt": pointer.updated_at,
                    "versions": len(pointer.history),
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no datasets in {store.describe()} (add one with: lora-pipeline dataset add STYLE SOURCE)")
        return
    for row in rows:
        click.echo(
            f"{row['style']:<32} {row['datasetHash'][:12]}  {row['images']:>5} images  "
            f"{row['versions']} version(s)  {row['updatedAt']}"
        )


@dataset.command("show")
@click.argument("style")
@click.option("--version", "dataset_hash", help="A dataset hash (default: the current version).")
@click.option("--json", "as_json", is_flag=True)
def show(style: str, dataset_hash: str | None, as_json: bool) -> None:
    """STYLE's current (or given) dataset version: stats, captions, rejected files."""
    style = _style(style)
    store = _store()
    try:
        manifest = read_manifest(store, style, dataset_hash) if dataset_hash else current_dataset(store, style)
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if manifest is None:
        raise click.ClickException(f"no dataset for style {style!r} in {store.describe()}")
    if as_json:
        click.echo(manifest.to_json().decode())
        return
    stats = dataset_stats(manifest.images)
    pointer, _ = read_pointer(store, style)
    click.echo(f"style {style}  dataset {manifest.dataset_hash}")
    click.echo(f"created {manifest.created_at}  from {manifest.source or '?'}  trigger word {manifest.trigger_word!r}")
    click.echo(
        f"{stats.image_count} images, {stats.total_bytes / 1e6:.2f} MB, shortest side "
        f"{stats.min_side}–{stats.max_side} px, captions {stats.caption_coverage:.0%} own"
    )
    click.echo("resolutions: " + ", ".join(f"{k} ×{v}" for k, v in stats.top_resolutions.items()))
    for entry in manifest.images:
        click.echo(f"  {entry.source:<40} {entry.width}x{entry.height}  {_clip(entry.caption)}")
    if manifest.rejected:
        click.echo(f"rejected ({len(manifest.rejected)}):")
        for r in manifest.rejected:
            click.echo(f"  {r.source}: {r.reason}")
    if pointer is not None and len(pointer.history) > 1:
        click.echo("versions (newest first): " + ", ".join(h.dataset_hash[:12] for h in pointer.history))


def _print_rejected(report: IngestReport) -> None:
    if report.rejected:
        click.echo(f"rejected ({len(report.rejected)}):")
        for r in report.rejected:
            click.echo(f"  {r.source}: {r.reason}")


def _clip(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class _Bars:
    """tqdm bars per stage ("check", "upload") on stderr, fed by ingest's progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr is not None
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()  # uploads report from several threads, maybe out of order

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            bar = self._bars.get(stage)
            if bar is None:
                from tqdm import tqdm

                bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="file", file=sys.stderr, leave=True)
            if done > bar.n:
                bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
