"""``lora-pipeline registry …``: read and repair the registry of the configured store."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from lora_pipeline.registry.models import InvalidRecord
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.settings import SettingsError, load_settings
from lora_pipeline.storage.base import ObjectStore, StorageError


def _open_store() -> ObjectStore:
    from lora_pipeline.storage.factory import open_configured_store

    try:
        return open_configured_store()
    except (SettingsError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None


def _style(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return validate_style(value)
    except InvalidStyleName as exc:
        raise click.BadParameter(str(exc)) from None


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group()
def registry() -> None:
    """The versioned LoRA registry: one training_versions.json per style (LORA_STORAGE_URL)."""


@registry.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: style → summary.")
def list_styles(as_json: bool) -> None:
    """Every style with its latest version and version counts by status."""
    from lora_pipeline.storage.registry_io import RegistryStore

    reg = RegistryStore(_open_store())
    try:
        problems: list[str] = []
        index, _ = reg.fresh_index(repair=False, problems=problems)  # listing only: writes nothing
        if problems:
            raise click.ClickException("; ".join(problems))
        summaries = dict(sorted(index.styles.items()))
    except (StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json({
            s: {"latestVersion": v.latest_version, "statuses": v.statuses, "unfinishedJobs": len(v.unfinished)}
            for s, v in summaries.items()
        })
        return
    if not summaries:
        click.echo("no styles in the registry")
    for style, s in summaries.items():
        counts = ", ".join(f"{n} {status}" for status, n in sorted(s.statuses.items()))
        click.echo(f"{style}\tlatest {s.latest_version or '-'}\t{counts}")


@registry.command()
@click.argument("style", callback=_style)
@click.option("--json", "as_json", is_flag=True, help="The document as stored (training_versions.json).")
def show(style: str, as_json: bool) -> None:
    """One style's versions: status, job id, URL, error."""
    from lora_pipeline.storage.registry_io import RegistryStore

    try:
        document, etag = RegistryStore(_open_store()).read(style)
    except (StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if etag is None:
        raise click.ClickException(f"style {style!r} has no registry document")
    if as_json:
        _echo_json(document.to_dict())
        return
    for v in document.versions:
        line = f"{v.name}\t{v.status.value}\t{v.id or '-'}\t{v.lora_url or '-'}"
        click.echo(line + (f"\terror: {v.error}" if v.error else ""))


@registry.command()
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with changed_versions and details.")
@click.option("--max-job-age-hours", type=click.FloatRange(min=0, min_open=True), default=25.0,
              show_default=True, help="A job RunPod no longer knows is failed only after this age.")
@click.option("--poll/--no-poll", default=True, show_default=True,
              help="Poll RunPod for unfinished jobs (when RUNPOD_ENDPOINT_ID is set).")
@click.option("--housekeeping/--no-housekeeping", default=True, show_default=True,
              help="Then prune settled jobs' old webhook files, finished versions' checkpoints and idle "
                   "lock files (LORA_WEBHOOK_RETENTION_DAYS, LORA_CHECKPOINT_RETENTION_DAYS, "
                   "LORA_LOCK_RETENTION_DAYS).")
def reconcile(dry_run: bool, as_json: bool, max_job_age_hours: float, poll: bool, housekeeping: bool) -> None:
    """Bring the registry in line with the store's LoRA files, the webhook inbox and RunPod."""
    from lora_pipeline.housekeeping import Retention, housekeep
    from lora_pipeline.reconcile import reconcile as run_reconcile

    try:
        retention = Retention.from_env() if housekeeping else None
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    store = _open_store()
    status_lookup = None
    settings = load_settings()
    if poll and settings.runpod_endpoint_id:
        from lora_pipeline.runpod.client import RunPodClient

        status_lookup = RunPodClient.from_settings(settings).status
    try:
        report = run_reconcile(store, status_lookup=status_lookup, dry_run=dry_run,
                               max_job_age=timedelta(hours=max_job_age_hours))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    pruned = housekeep(store, retention=retention, dry_run=dry_run) if retention is not None else None
    if as_json:
        _echo_json({**report.to_dict(), **({"housekeeping": pruned.to_dict()} if pruned else {})})
        return
    verb = "would change" if dry_run else "changed"
    click.echo(f"{verb} {report.changed_versions} version(s) in {len({c.style for c in report.changes})} style(s)")
    for row in report.rows():
        click.echo(f"  {row['style']} {row['version']}: {row['change']} "
                   f"({row['status_before'] or 'new'} → {row['status_after']}) {row['fields']}")
    for problem in report.problems:
        click.echo(f"  problem: {problem}", err=True)
    if pruned is not None:
        click.echo(pruned.summary())
        if dry_run:
            for key in (key for keys in pruned.deleted.values() for key in keys):
                click.echo(f"  would delete {key}")
        for problem in pruned.problems:
            click.echo(f"  problem: {problem}", err=True)


@registry.command("import-legacy")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object with what was imported and folded.")
def import_legacy_command(directory: Path, as_json: bool) -> None:
    """Import DIRECTORY/<style>/training_versions.json files (the old dashboard's tree); never modifies them."""
    from lora_pipeline.legacy import import_legacy

    try:
        report = import_legacy(_open_store(), directory)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(f"imported {len(report.imported)} style(s); {report.changed_versions} version(s) changed")
        for folded in report.folded:
            click.echo(f"  folded {folded.records} records of {folded.style} {folded.version} into one")
        for problem in report.problems:
            click.echo(f"  problem: {problem}", err=True)
    if report.problems and not report.imported:
        raise SystemExit(1)
