"""``lora-pipeline registry …``: read and repair the registry of the configured store."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lora_pipeline.registry.aliases import AliasAction
from lora_pipeline.registry.models import (
    UNFINISHED_STATUSES,
    InvalidRecord,
    JobProgress,
    UnknownVersion,
    VersionStatus,
    from_epoch_ms,
)
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.settings import SettingsError, get_settings
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.keys import alias_pointer_key

if TYPE_CHECKING:  # the commands import what they run, so that --help stays fast
    from lora_pipeline.lifecycle.housekeeping import HousekeepingReport
    from lora_pipeline.lifecycle.reconcile import ReconcileReport
    from lora_pipeline.lifecycle.versions import PruneReport


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
    """Every style with its latest version (its family on its base model), version counts by status
    and aliases (alias → version)."""
    from lora_pipeline.registry_store.documents import RegistryStore

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
        _echo_json(
            {
                s: {
                    "latestVersion": v.latest_version,
                    "latestFamily": v.latest_family,
                    "latestBaseModel": v.latest_base_model,
                    "statuses": v.statuses,
                    "unfinishedJobs": len(v.unfinished),
                    "aliases": {a: p.version for a, p in sorted(v.aliases.items())},
                }
                for s, v in summaries.items()
            }
        )
        return
    if not summaries:
        click.echo("no styles in the registry")
    for style, s in summaries.items():
        counts = ", ".join(f"{n} {status}" for status, n in sorted(s.statuses.items()))
        named = ", ".join(f"{a} → {p.version}" for a, p in sorted(s.aliases.items()))
        model = f"{s.latest_family or '-'} on {s.latest_base_model or '-'}"
        click.echo(
            f"{style}\tlatest {s.latest_version or '-'} ({model})\t{counts}" + (f"\taliases: {named}" if named else "")
        )


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="The document as JSON with duplicates folded, as the registry reads it "
    "(not byte for byte the stored training_versions.json); with VERSION, that version's record.",
)
def show(style: str, version: str | None, as_json: bool) -> None:
    """One style's versions (or only VERSION: V3, or an alias as @production): status, family on
    base model, job id, URL, error."""
    from lora_pipeline.registry_store.documents import RegistryStore

    primary = get_settings().primary_format
    try:
        document, etag = RegistryStore(_open_store(), primary=primary).read(style)
    except (StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if etag is None:
        raise click.ClickException(f"style {style!r} has no registry document")
    versions = list(document.versions)
    if version is not None:
        try:
            versions = [document.resolve(version)]
        except UnknownVersion as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            _echo_json(versions[0].to_dict(primary))
            return
    elif as_json:
        _echo_json(document.to_dict(primary))
        return
    named = document.aliases
    if named:
        click.echo("aliases: " + ", ".join(f"{alias} → {name}" for alias, name in named.items()))
    for v in versions:
        main = v.download(primary)
        model = f"{v.family.value if v.family else '-'} on {v.base_model.value if v.base_model else '-'}"
        line = f"{v.name}\t{v.status.value}\t{model}\t{v.id or '-'}\t{(main.url if main else v.lora_url) or '-'}"
        if v.deletion is not None:
            line += f"\tdeleted by {v.deletion.by}" + (f": {v.deletion.reason}" if v.deletion.reason else "")
        click.echo(line + (f"\terror: {v.error}" if v.error else ""))
        if v.progress is not None and v.status in UNFINISHED_STATUSES:  # a finished job's last heartbeat says nothing
            click.echo(f"\tprogress\t{_progress_line(v.progress)}")
        for layout, f in sorted(v.files().items()):
            click.echo(f"\t{layout}\t{f.key}\t{f.size} bytes\t{f.url or '-'}")


def _progress_line(progress: JobProgress, now: datetime | None = None) -> str:
    """A version's last heartbeat: step/total, loss, phase, heartbeat age, stalled (with why)."""
    parts = []
    if progress.step is not None:
        parts.append(f"step {progress.step}" + (f"/{progress.total}" if progress.total is not None else ""))
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4g}")
    if progress.phase:
        parts.append(progress.phase)
    age = max(0, int(((now or datetime.now(UTC)) - from_epoch_ms(progress.heartbeat_at)).total_seconds()))
    parts.append(f"heartbeat {age}s ago")
    if progress.stalled is not None:
        parts.append(f"STALLED: {progress.stalled}")
    return "\t".join(parts)


_FORMAT_HELP = (
    "kohya: ComfyUI, AUTOMATIC1111/Forge, kohya's tools; diffusers: load_lora_weights. "
    "Default: LORA_PRIMARY_FORMAT (kohya)."
)


def _pick_file(store: ObjectStore, style: str, version_name: str | None, layout: str | None):
    """(version, file) of ``style`` in ``layout``: the named version (``V3``, ``@production``), else
    the latest completed."""
    from lora_pipeline.registry.safetensors_header import InvalidLoraFile
    from lora_pipeline.registry_store.documents import RegistryStore
    from lora_pipeline.registry_store.lora_files import read_header

    try:
        layout = layout or get_settings().primary_format
        document, etag = RegistryStore(store).read(style)
    except (StorageError, InvalidRecord, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if etag is None:
        raise click.ClickException(f"style {style!r} has no registry document")
    if version_name is None:
        latest = document.latest_completed
        if latest is None:
            raise click.ClickException(f"style {style!r} has no completed version")
        version = latest
    else:
        try:
            version = document.resolve(version_name)
        except UnknownVersion as exc:
            raise click.ClickException(str(exc)) from None
        if version.status is not VersionStatus.completed:
            raise click.ClickException(f"{style} {version.name} is {version.status.value}: it has no LoRA file")
    files = version.files()
    if layout not in files and version.file is not None and version.file.layout is None:
        try:  # recorded before layouts were read: read its header now
            found = read_header(store, version.file.key).layout
        except (InvalidLoraFile, StorageError) as exc:
            raise click.ClickException(str(exc)) from None
        if found == layout:
            files[layout] = replace(version.file, layout=found, url=version.lora_url)
    chosen = files.get(layout)
    if chosen is None:
        has = ", ".join(sorted(files)) or "no file whose layout is known"
        raise click.ClickException(
            f"{style} {version.name} has no {layout} file (it has: {has}); versions trained before both "
            "layouts were published have only the diffusers one"
        )
    return version, chosen


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version", required=False)
@click.option("--format", "layout", type=click.Choice(["kohya", "diffusers"]), default=None, help=_FORMAT_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="File to write, or an existing directory; default: the file's own name here.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: path, layout, size, checksums.")
def download(style: str, version: str | None, layout: str | None, output: Path | None, as_json: bool) -> None:
    """Download a version's LoRA file (default: the latest completed one) in the layout your tool
    loads; its checksum is verified against the registry and the file's own header."""
    from lora_pipeline.registry.safetensors_header import InvalidLoraFile
    from lora_pipeline.registry_store.lora_files import verify_local_file

    store = _open_store()
    chosen_version, f = _pick_file(store, style, version, layout)
    name = f.key.rsplit("/", 1)[-1]
    target = output / name if output is not None and output.is_dir() else (output or Path(name))
    partial = target.with_name(f".{target.name}.partial")
    try:
        store.download_file(f.key, partial)
        header, tensors_sha, file_sha = verify_local_file(partial)
        for source, expected in (("the registry", f.checksum), ("the file's header", header.checksum)):
            if expected and expected != tensors_sha:
                raise InvalidLoraFile(
                    f"checksum mismatch: its tensor data hashes to {tensors_sha}, {source} says {expected}"
                )
    except (InvalidLoraFile, StorageError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise click.ClickException(f"{f.key}: download failed: {exc}") from None
    partial.replace(target)
    result = {
        "style": style,
        "version": chosen_version.name,
        "layout": f.layout,
        "key": f.key,
        "path": str(target),
        "size": target.stat().st_size,
        "tensorsSha256": tensors_sha,
        "sha256": file_sha,
        "verified": bool(f.checksum or header.checksum),
    }
    if as_json:
        _echo_json(result)
        return
    check = "checksum verified" if result["verified"] else "no checksum recorded to verify"
    click.echo(
        f"{target}\t{style} {chosen_version.name} {f.layout}\t{result['size']} bytes\t{check}\tsha256 {file_sha}"
    )


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version", required=False)
@click.option("--format", "layout", type=click.Choice(["kohya", "diffusers"]), default=None, help=_FORMAT_HELP)
@click.option(
    "--expires",
    type=click.IntRange(min=1, max=7 * 24 * 3600),
    default=3600,
    show_default=True,
    help="Seconds the URL stays valid.",
)
def url(style: str, version: str | None, layout: str | None, expires: int) -> None:
    """Print a presigned (temporary) download URL of a version's LoRA file (default: the latest
    completed one) in the layout your tool loads. Never stored in the registry."""
    store = _open_store()
    _, f = _pick_file(store, style, version, layout)
    try:
        click.echo(store.presigned_url(f.key, expires_in=expires))
    except (StorageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@registry.command()
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with changed_versions and details.")
@click.option(
    "--max-job-age-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=25.0,
    show_default=True,
    help="A job RunPod no longer knows is failed only after this age.",
)
@click.option(
    "--poll/--no-poll",
    default=True,
    show_default=True,
    help="Poll RunPod for unfinished jobs (when RUNPOD_ENDPOINT_ID is set).",
)
@click.option(
    "--housekeeping/--no-housekeeping",
    default=True,
    show_default=True,
    help="Then prune settled jobs' old webhook files, finished versions' checkpoints and idle "
    "lock files (LORA_WEBHOOK_RETENTION_DAYS, LORA_CHECKPOINT_RETENTION_DAYS, "
    "LORA_LOCK_RETENTION_DAYS), and completed versions beyond LORA_KEEP_VERSIONS.",
)
def reconcile(dry_run: bool, as_json: bool, max_job_age_hours: float, poll: bool, housekeeping: bool) -> None:
    """Bring the registry in line with the store's LoRA files, the webhook inbox and RunPod."""
    from lora_pipeline.lifecycle.housekeeping import Retention, housekeep
    from lora_pipeline.lifecycle.reconcile import reconcile as run_reconcile

    settings = get_settings()  # checked when the command started
    retention = Retention.from_settings(settings) if housekeeping else None
    store = _open_store()
    status_lookup = None
    if poll and settings.runpod_endpoint_id:
        from lora_pipeline.backends.runpod_client import RunPodClient

        status_lookup = RunPodClient.from_settings(settings).status
    try:
        report = run_reconcile(
            store, status_lookup=status_lookup, dry_run=dry_run, max_job_age=timedelta(hours=max_job_age_hours)
        )
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    pruned = housekeep(store, retention=retention, dry_run=dry_run) if retention is not None else None
    kept = None
    if housekeeping and settings.keep_versions:
        from lora_pipeline.lifecycle.versions import prune_versions

        try:
            kept = prune_versions(store, settings.keep_versions, dry_run=dry_run)
        except StorageError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(
            {
                **report.to_dict(),
                **({"housekeeping": pruned.to_dict()} if pruned else {}),
                **({"versionRetention": kept.to_dict()} if kept else {}),
            }
        )
        return
    _echo_reconciliation(report, pruned, kept, dry_run=dry_run)


def _echo_reconciliation(
    report: ReconcileReport, pruned: HousekeepingReport | None, kept: PruneReport | None, *, dry_run: bool
) -> None:
    """The reconciliation's changes, then the housekeeping's and the version retention's, as lines."""
    verb = "would change" if dry_run else "changed"
    click.echo(f"{verb} {report.changed_versions} version(s) in {len({c.style for c in report.changes})} style(s)")
    for row in report.rows():
        click.echo(
            f"  {row['style']} {row['version']}: {row['change']} "
            f"({row['status_before'] or 'new'} → {row['status_after']}) {row['fields']}"
        )
    for key in report.leftovers_removed:
        click.echo(f"  {'would remove' if dry_run else 'removed'} {key} (left behind by an interrupted delete)")
    for problem in report.problems:
        click.echo(f"  problem: {problem}", err=True)
    if pruned is not None:
        click.echo(pruned.summary())
        if dry_run:
            for key in (key for keys in pruned.deleted.values() for key in keys):
                click.echo(f"  would delete {key}")
        for problem in pruned.problems:
            click.echo(f"  problem: {problem}", err=True)
    if kept is not None:
        click.echo(kept.summary())
        for style, names in sorted(kept.deleted.items()):
            click.echo(f"  {'would delete' if dry_run else 'deleted'} {style} {', '.join(names)}")
        for problem in kept.problems:
            click.echo(f"  problem: {problem}", err=True)


@registry.command("import-legacy")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object with what was imported and folded.")
def import_legacy_command(directory: Path, as_json: bool) -> None:
    """Import DIRECTORY/<style>/training_versions.json files (the old dashboard's tree); never modifies them."""
    from lora_pipeline.lifecycle.legacy_import import import_legacy

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


_BY_HELP = "Who does it, for the history (default: your OS user name)."


def _by(value: str | None) -> str:
    from lora_pipeline.lifecycle.versions import default_actor

    return value or default_actor()


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version")
@click.option("--alias", default="production", show_default=True, help="The alias to move (e.g. staging).")
@click.option("--reason", default=None, help="Why, for the alias history.")
@click.option("--by", default=None, help=_BY_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: alias, version, previous, moved.")
def promote(style: str, version: str, alias: str, reason: str | None, by: str | None, as_json: bool) -> None:
    """Point ALIAS (default production) at a completed VERSION whose files parse; recorded in the
    style's alias history with who, when and why."""
    _move(style, alias, "promote", version, reason, by, as_json)


@registry.command()
@click.argument("style", callback=_style)
@click.option("--alias", default="production", show_default=True, help="The alias to move back.")
@click.option("--reason", default=None, help="Why, for the alias history.")
@click.option("--by", default=None, help=_BY_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: alias, version, previous, moved.")
def rollback(style: str, alias: str, reason: str | None, by: str | None, as_json: bool) -> None:
    """Point ALIAS back at the version it pointed at before its current one (from its history)."""
    _move(style, alias, "rollback", None, reason, by, as_json)


@registry.command()
@click.argument("style", callback=_style)
@click.argument("alias")
@click.option("--reason", default=None, help="Why, for the alias history.")
@click.option("--by", default=None, help=_BY_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: alias, removed (the version it pointed at).")
def unalias(style: str, alias: str, reason: str | None, by: str | None, as_json: bool) -> None:
    """Remove ALIAS: it points at no version any more (recorded in the alias history). A removal is
    not rolled back: `promote` a version to set the alias again."""
    _move(style, alias, "remove", None, reason, by, as_json)


def _move(
    style: str, alias: str, action: AliasAction, version: str | None, reason: str | None, by: str | None, as_json: bool
) -> None:
    from lora_pipeline.registry_store.documents import Refused, RegistryStore

    try:
        result = RegistryStore(_open_store()).move_alias(
            style, alias, action=action, version=version, by=_by(by), reason=reason
        )
    except (Refused, StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if result.pointer_problem:
        click.echo(f"warning: {result.pointer_problem}", err=True)
    if action == "remove":
        if as_json:
            _echo_json({"style": style, "alias": result.alias, "removed": result.version})
        else:
            click.echo(f"{style} {alias}: removed (it pointed at {result.version})")
        return
    if as_json:
        _echo_json(
            {
                "style": style,
                "alias": result.alias,
                "version": result.version,
                "previous": result.previous,
                "moved": result.moved,
            }
        )
    elif not result.moved:
        click.echo(f"{style} {alias} already points at {result.version}; nothing changed")
    else:
        click.echo(f"{style} {alias}: {result.previous or '(new)'} → {result.version}")


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version")
def card(style: str, version: str) -> None:
    """Print the model card of VERSION (V3, or an alias as @production): family, base model,
    trigger word, params, dataset, samples, loss, lineage and files, as Markdown. The card stored
    beside the version's files (loras/<style>/<style>_v<N>.md) is written when it is recorded."""
    from lora_pipeline.registry.cards import model_card
    from lora_pipeline.registry_store.documents import RegistryStore

    try:
        document, etag = RegistryStore(_open_store()).read(style)
        if etag is None:
            raise click.ClickException(f"style {style!r} has no registry document")
        click.echo(model_card(document, document.resolve(version)), nl=False)
    except (StorageError, InvalidRecord, UnknownVersion) as exc:
        raise click.ClickException(str(exc)) from None


def _pointer(store: ObjectStore, style: str, alias: str) -> dict[str, str | None]:
    """The key of an alias's published pointer and its stable URL (None: the store has none)."""
    key = alias_pointer_key(style, alias)
    try:
        url = store.url(key)
    except ValueError:
        url = None
    return {"key": key, "url": url}


@registry.command()
@click.argument("style", callback=_style)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object: aliases (alias → version), pointers and history."
)
def aliases(style: str, as_json: bool) -> None:
    """A style's aliases and every move of them (who, when, why), oldest first."""
    from lora_pipeline.registry_store.documents import RegistryStore

    store = _open_store()
    try:
        document, etag = RegistryStore(store).read(style)
    except (StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if etag is None:
        raise click.ClickException(f"style {style!r} has no registry document")
    pointers = {alias: _pointer(store, style, alias) for alias in sorted({e.alias for e in document.alias_history})}
    if as_json:
        _echo_json(
            {
                "style": style,
                "aliases": document.aliases,
                "pointers": pointers,
                "history": [e.to_dict() for e in document.alias_history],
            }
        )
        return
    if not document.alias_history:
        click.echo(f"{style} has no aliases")
    for alias, name in document.aliases.items():
        click.echo(f"{alias}\t{name}\t{pointers[alias]['url'] or pointers[alias]['key']}")
    for e in document.alias_history:
        when = from_epoch_ms(e.at).isoformat(timespec="seconds")
        click.echo(
            f"  #{e.seq}\t{when}\t{e.alias}\t{e.action}\t{e.previous or '(new)'} → "
            + ("(removed)" if e.action == "remove" else e.version)
            + f"\tby {e.by}"
            + (f"\t{e.reason}" if e.reason else "")
        )


@registry.command()
@click.argument("style", callback=_style)
@click.argument("version")
@click.option("--reason", default=None, help="Why, kept in the version's tombstone.")
@click.option("--by", default=None, help=_BY_HELP)
@click.option("--dry-run", is_flag=True, help="List the files that would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: version, removed objects, dry run.")
def delete(style: str, version: str, reason: str | None, by: str | None, dry_run: bool, as_json: bool) -> None:
    """Delete a version's files (every layout) and leave a tombstone: the version stays in the document
    as deleted, is never brought back and its number never reused. An aliased version is refused."""
    from lora_pipeline.registry_store.documents import Refused, RegistryStore

    try:
        result = RegistryStore(_open_store()).delete_version(style, version, by=_by(by), reason=reason, dry_run=dry_run)
    except (Refused, StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(
            {
                "style": style,
                "version": result.version,
                "removed": result.removed,
                "dryRun": dry_run,
                "alreadyDeleted": result.already_deleted,
            }
        )
        return
    verb = "would delete" if dry_run else "deleted"
    state = " (already deleted: leftover files)" if result.already_deleted else ""
    click.echo(f"{style} {result.version}: {verb}{state}, {len(result.removed)} file(s)")
    for key in result.removed:
        click.echo(f"  {key}")


@registry.command()
@click.argument("style", callback=_style)
@click.argument("first")
@click.argument("second")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable). Default: V1's sample prompts.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="The seed of every image.")
@click.option("--steps", default=None, type=click.IntRange(1, 200), help="Inference steps (default: the training's).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: key, url, size, prompts, seed.")
def compare(
    style: str, first: str, second: str, prompts: tuple[str, ...], seed: int, steps: int | None, as_json: bool
) -> None:
    """Render two versions on the same prompts and seed, side by side in one image in the store
    (comparisons/<style>/<V1>_vs_<V2>.png): loads their base model (needs the `train` extra)."""
    from lora_pipeline.worker.compare import ComparisonError, comparison_json, render_comparison

    try:
        result = render_comparison(_open_store(), style, first, second, prompts=prompts, seed=seed, steps=steps)
    except (ComparisonError, StorageError, InvalidRecord) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(comparison_json(result))
        return
    click.echo(
        f"{style} {result.versions[0]} vs {result.versions[1]}: {len(result.prompts)} prompt(s), seed {result.seed}"
    )
    width = max((len(what) for what, _, _ in result.rows), default=0)
    click.echo(f"{'':{width}}  {result.versions[0]:<14}  {result.versions[1]}")
    for what, first_value, second_value in result.rows:
        click.echo(f"{what:{width}}  {first_value:<14}  {second_value}")
    click.echo(result.key)
    click.echo(result.url)
