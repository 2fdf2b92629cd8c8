"""Jobs that move aliases and delete versions: a click in the UI, each run in the run history.

``promote_lora_version``: config ``style``, ``action`` (promote | rollback | remove), ``version``
(for a promote), ``alias`` (default production), ``reason``. ``delete_lora_version``: ``style``,
``version``, ``reason``, ``dry_run``. Who acted is the run's ``dagster/user`` tag when the UI
set one (Dagster+), else ``dagster run <run id>``. A refusal (unknown version or alias, a
version not completed, an aliased version to delete…) fails the run with its reason.
"""

from typing import Literal

import dagster as dg
from pydantic import Field

from lora_pipeline.defs.assets.lora_registry import aliases_markdown, registry_state, versions_markdown
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry_store.documents import Refused, RegistryStore
from lora_pipeline.registry.aliases import validate_alias
from lora_pipeline.registry.models import InvalidRecord, RegistryDocument, VersionStatus
from lora_pipeline.registry.names import validate_style
from lora_pipeline.storage.base import StorageError


class AliasMoveConfig(dg.Config):
    style: str = Field(description="The style, e.g. style_59.")
    action: Literal["promote", "rollback", "remove"] = Field(
        "promote",
        description="promote: point the alias at `version`; rollback: back to its previous version; "
        "remove: the alias points at nothing (as `registry unalias`).",
    )
    version: str | None = Field(None, description="The version to promote, e.g. V3 (unused by rollback).")
    alias: str = Field("production", description="The alias to move (production, staging…).")
    reason: str | None = Field(None, description="Why, for the alias history.")


class DeleteVersionConfig(dg.Config):
    style: str = Field(description="The style, e.g. style_59.")
    version: str = Field(description="The version to delete, e.g. V2 (refused while an alias points at it).")
    reason: str | None = Field(None, description="Why, kept in the version's tombstone.")
    dry_run: bool = Field(False, description="Report the files that would be deleted; change nothing.")


def run_actor(context: dg.OpExecutionContext) -> str:
    """Who started the run: its ``dagster/user`` tag, else the run id."""
    return context.run.tags.get("dagster/user") or f"dagster run {context.run_id}"


def registry_observation(style: str, document: RegistryDocument, primary: str, change: str) -> dg.AssetObservation:
    """An observation of ``lora_registry[style]`` showing the aliases and versions as ``document``
    has them: what the UI shows after a change, with no new materialization."""
    return dg.AssetObservation(
        asset_key="lora_registry",
        partition=style,
        description=change,
        metadata={
            "change": change,
            "aliases": dg.MetadataValue.md(aliases_markdown(document, primary)),
            "versions_table": dg.MetadataValue.md(versions_markdown(document)),
            "registry_state": registry_state(document),
        },
    )


def observe_registry(
    context: dg.OpExecutionContext, style: str, document: RegistryDocument, primary: str, change: str
) -> None:
    """Record the change as an observation of ``lora_registry[style]`` (``document``: as the change
    wrote it). Skipped for a style the instance has no partition for (a style made by the CLI
    before discovery); ``registry_change_sensor`` observes it once it has one."""
    if not context.instance.has_dynamic_partition(STYLES_PARTITIONS_NAME, style):
        return
    context.log_event(registry_observation(style, document, primary, change))


def checked_alias_move(config: dict) -> dict:
    """The run config of ``promote_lora_version``, checked when the run is created (the launchpad,
    the API): a bad style, alias or version, or a version that cannot be promoted, refuses the
    launch with one line instead of a run that fails. The store is read with the configured
    settings; when it cannot be read the run itself decides (under its conditional write)."""
    checked = AliasMoveConfig.model_validate(config)
    try:
        validate_style(checked.style)
        validate_alias(checked.alias)
        if checked.action == "promote":
            if not checked.version:
                raise ValueError("version: promote needs a version, e.g. V3, or an alias as @staging")
            _check_promotable(checked.style, checked.version)
    except ValueError as exc:
        raise dg.DagsterInvalidConfigError(f"promote_lora_version config: {exc}", [], config) from None
    return config


def _check_promotable(style: str, ref: str) -> None:
    """ValueError when the style's registry names no completed version ``ref``."""
    try:
        document, etag = RegistryStore(StorageResource().get_store()).read(style)
    except (StorageError, InvalidRecord, dg.DagsterInvariantViolationError):
        return
    if etag is None:
        raise ValueError(f"style {style!r} has no registry document")
    version = document.resolve(ref)
    if version.status is not VersionStatus.completed:
        raise ValueError(f"{style} {version.name} is {version.status.value}: only a completed version can be promoted")


@dg.op(tags={"kind": "s3"})
def move_alias(context: dg.OpExecutionContext, config: AliasMoveConfig, storage: StorageResource) -> None:
    """Move an alias of a style (one conditional write of its registry document)."""
    registry = RegistryStore(storage.get_store())
    try:
        result = registry.move_alias(
            config.style,
            config.alias,
            action=config.action,
            version=config.version,
            by=run_actor(context),
            reason=config.reason,
        )
    except (Refused, StorageError, ValueError) as exc:
        raise dg.Failure(description=f"{config.action} refused: {exc}") from None
    removed = config.action == "remove"
    context.add_output_metadata(
        {
            "style": config.style,
            "alias": result.alias,
            "version": "" if removed else result.version,
            "previous": result.version if removed else (result.previous or ""),
            "moved": result.moved,
        }
    )
    if removed:
        change = f"{config.style} {result.alias}: removed (it pointed at {result.version})"
    else:
        change = f"{config.style} {result.alias}: {result.previous or '(new)'} → {result.version}" + (
            "" if result.moved else " (unchanged)"
        )
    context.log.info(change)
    if result.moved or removed:
        observe_registry(context, config.style, result.document, registry.primary, change)


@dg.op(tags={"kind": "s3"})
def delete_lora_version_op(
    context: dg.OpExecutionContext, config: DeleteVersionConfig, storage: StorageResource
) -> None:
    """Delete a version's files and leave its tombstone."""
    registry = RegistryStore(storage.get_store())
    try:
        result = registry.delete_version(
            config.style,
            config.version,
            by=run_actor(context),
            reason=config.reason,
            dry_run=config.dry_run,
        )
    except (Refused, StorageError, ValueError) as exc:
        raise dg.Failure(description=f"delete refused: {exc}") from None
    context.add_output_metadata(
        {
            "style": config.style,
            "version": result.version,
            "dry_run": config.dry_run,
            "already_deleted": result.already_deleted,
            "removed": dg.MetadataValue.json(result.removed),
        }
    )
    change = (
        f"{config.style} {result.version}: {'would delete' if config.dry_run else 'deleted'} "
        f"{len(result.removed)} file(s)"
    )
    context.log.info(change)
    if not config.dry_run and not result.already_deleted:
        observe_registry(context, config.style, result.document, registry.primary, change)


@dg.graph(
    # The run config stays `ops: {move_lora_alias: {config: ...}}`, checked at launch.
    config=dg.ConfigMapping(
        config_schema=AliasMoveConfig.to_config_schema(),
        config_fn=lambda config: {"move_alias": {"config": checked_alias_move(config)}},
    )
)
def move_lora_alias() -> None:
    """Move an alias of a style, its config checked when the run is created."""
    move_alias()


@dg.job(tags={"lora_pipeline/kind": "registry"})
def promote_lora_version() -> None:
    """Promote a version to an alias (production by default), roll the alias back, or remove it."""
    move_lora_alias()


@dg.job(tags={"lora_pipeline/kind": "registry"})
def delete_lora_version() -> None:
    """Delete a version's files, leaving a tombstone (refused for an aliased version)."""
    delete_lora_version_op()
