"""``training_dataset``: a style's images and captions, checked, content-hashed and stored."""

import dagster as dg
from pydantic import Field

from lora_pipeline.dataset.ingest import (
    SAMPLE_TRIGGER_WORD,
    EmptyDatasetError,
    IngestOptions,
    IngestReport,
    current_dataset,
    ingest_dataset,
    sample_dataset_path,
    stored_version_report,
)
from lora_pipeline.dataset.report import MIN_IMAGES, CheckOutcome, check_caption_coverage, check_min_images
from lora_pipeline.defs.declared_styles import DeclaredStyles, StyleDeclaration
from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.presentation import OWNERS, store_kind
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.storage.keys import in_api_upload

SAMPLE_STYLE = "sample_style"
INCOMING_PREFIX = "incoming/"
MIN_CAPTION_COVERAGE = 0.5
# The table the asset emits (`rejected_files`): each file left out of the version and why.
REJECTED_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("file", "string", description="the file's path in the source"),
        dg.TableColumn("reason", "string", description="why it was rejected (unreadable, too small, no caption, …)"),
    ]
)


class DatasetConfig(dg.Config):
    """Where a style's data comes from and how strictly it is checked."""

    source: str | None = Field(
        None,
        description="A local folder, a .zip, or 'store:<prefix>'. Default: the style's declared "
        "source (a LoraTraining defs.yaml), else the store's incoming/<style>/ folder, or the "
        "bundled sample for 'sample_style'.",
    )
    trigger_word: str | None = Field(
        None, description="Caption for images without one (default: the style's declared trigger word, else its name)."
    )
    prepend_trigger_word: bool = Field(False, description="Also put the trigger word in front of every caption.")
    min_side: int = Field(64, description="Images with a shorter side are rejected.")
    missing_captions: str = Field("fill", description="'fill' from the trigger word, or 'reject'.")


def resolve_source(style: str, config: DatasetConfig, store, declaration: StyleDeclaration | None = None) -> str | None:
    """The source to ingest: explicit, else the declared one, else the incoming folder, else None
    when the style has a stored dataset version (``lora-pipeline dataset add`` made it: that
    version is materialized), else the bundled sample."""
    if config.source:
        return config.source
    if declaration is not None and declaration.source:
        return declaration.source
    incoming = f"{INCOMING_PREFIX}{style}/"
    if any(not in_api_upload(info.key[len(incoming) :]) for info in store.list(incoming)):
        return f"store:{incoming}"
    if current_dataset(store, style) is not None:
        return None
    if style == SAMPLE_STYLE:
        return str(sample_dataset_path())
    raise dg.Failure(
        description=f"no source for style {style!r}: give config 'source', upload to "
        f"{INCOMING_PREFIX}{style}/ in the store ({store.describe().rstrip('/')}/{incoming}), "
        f"or run `lora-pipeline dataset add {style} DIR`"
    )


@dg.asset(
    partitions_def=styles_partitions,
    group_name="lora",
    kinds={store_kind(), "pillow"},
    owners=OWNERS,
    metadata={"dagster/column_schema": REJECTED_SCHEMA},
    check_specs=[
        dg.AssetCheckSpec(
            "enough_images", asset="training_dataset", description=f"At least {MIN_IMAGES} accepted images."
        ),
        dg.AssetCheckSpec(
            "caption_coverage",
            asset="training_dataset",
            description=f"At least {MIN_CAPTION_COVERAGE:.0%} of images have their own caption.",
        ),
    ],
)
def training_dataset(
    context: dg.AssetExecutionContext,
    config: DatasetConfig,
    storage: StorageResource,
    declared_styles: dg.ResourceParam[DeclaredStyles],
) -> dg.MaterializeResult:
    """Validate a style's images and captions and store them as a content-hashed version.

    The data version is the dataset hash, so the same data materialized again is
    recognised as unchanged and triggers no new training.
    """
    style = context.partition_key
    store = storage.get_store()
    declaration = declared_styles.get(style)
    source = resolve_source(style, config, store, declaration)
    trigger_word = (
        config.trigger_word
        or (declaration.trigger_word if declaration else None)
        or (SAMPLE_TRIGGER_WORD if style == SAMPLE_STYLE else None)
    )
    if source is None:
        stored = stored_version_report(store, style)
        if stored is None:  # removed since resolve_source saw it
            raise dg.Failure(description=f"style {style!r}: its current dataset version is no longer in the store")
        context.log.info(f"no new source for style {style}: materializing {stored.source}")
        return _result(stored)
    context.log.info(f"ingesting {source} for style {style}")
    try:
        report = ingest_dataset(
            store,
            style,
            source,
            options=IngestOptions(
                trigger_word=trigger_word,
                min_side=config.min_side,
                # A str in the Dagster config (a Literal would change its schema to an enum);
                # IngestOptions checks the value and raises naming the choices.
                missing_captions=config.missing_captions,  # type: ignore[arg-type]
                prepend_trigger_word=config.prepend_trigger_word,
            ),
            progress=_progress_logger(context),
        )
    except EmptyDatasetError as exc:
        raise dg.Failure(description=str(exc), metadata=exc.report.dagster_metadata()) from None
    context.log.info(report.summary())
    return _result(report)


def _result(report: IngestReport) -> dg.MaterializeResult:
    """The materialization of a dataset version: its hash as the data version, its checks."""
    manifest = report.manifest
    assert manifest is not None
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest.dataset_hash),
        metadata=report.dagster_metadata(),
        check_results=[
            _check_result("enough_images", check_min_images(manifest, MIN_IMAGES)),
            _check_result("caption_coverage", check_caption_coverage(manifest, MIN_CAPTION_COVERAGE)),
        ],
    )


def _progress_logger(context: dg.AssetExecutionContext):
    """Log every 100th file and the last: a large dataset must not flood the event log."""

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            context.log.info(f"{stage}: {done}/{total} files")

    return progress


def _check_result(name: str, outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.passed,
        description=outcome.description,
        metadata=outcome.metadata,
        severity=dg.AssetCheckSeverity.WARN,
    )
