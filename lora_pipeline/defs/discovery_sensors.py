"""Discovery sensors: new styles in the store become partitions; new dataset versions can train."""

import hashlib
import re
from collections.abc import Callable

import dagster as dg

from lora_pipeline.dataset.versions import current_key, style_folders
from lora_pipeline.defs.assets.training_dataset import INCOMING_PREFIX, SAMPLE_STYLE
from lora_pipeline.defs.declared_styles import DeclaredStyles
from lora_pipeline.defs.jobs import train_lora
from lora_pipeline.defs.outages import store_outage_skip
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.keys import DATASETS, REGISTRY, in_api_upload, registry_key


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["training_dataset"],
    description="Adds a partition for every style found in the store (incoming/, datasets/, "
    "registry) or declared in a LoraTraining defs.yaml, and ingests styles dropped under incoming/<style>/.",
)
def style_discovery_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, declared_styles: dg.ResourceParam[DeclaredStyles]
) -> dg.SensorResult:
    """Every 30 s: what it reads grows with the number of styles, not with their images.

    Styles with a registry document or a current dataset version come from
    one-level listings of ``registry/`` and ``datasets/`` (style folders, never the
    images, versions or backups below them), and only a folder that is not a
    partition yet costs one HEAD of its document. ``incoming/`` is listed in full:
    its files are what a changed drop is recognised by.
    """
    partitions = set(context.instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME))
    try:
        store = storage.get_sensor_store()
        stored = _new_stored_styles(store, partitions)
        incoming = _incoming_fingerprints(store)
    except StorageError as exc:
        return dg.SensorResult(skip_reason=store_outage_skip(exc))
    new = sorted((stored | set(incoming) | always_present_styles(declared_styles)) - partitions)
    requests = [
        dg.RunRequest(run_key=f"incoming:{style}:{fingerprint}", partition_key=style)
        for style, fingerprint in sorted(incoming.items())
    ]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(STYLES_PARTITIONS_NAME, new)] if new else [],
        skip_reason=None if (requests or new) else dg.SkipReason("no new styles"),
    )


def always_present_styles(declared_styles: DeclaredStyles) -> set[str]:
    """The styles that are partitions whatever the store holds: the bundled sample and every
    declared style (``lora-pipeline styles sync`` adds them to an instance before any tick)."""
    return {SAMPLE_STYLE} | set(declared_styles)


def _new_stored_styles(store: ObjectStore, known: set[str]) -> set[str]:
    """Styles not in ``known`` with a registry document or a current dataset version."""
    found: set[str] = set()
    for top, document_key in ((REGISTRY, registry_key), (DATASETS, current_key)):
        for style in style_folders(store, top):
            if style not in known and style not in found and store.head(document_key(style)) is not None:
                found.add(style)
    return found


def _incoming_fingerprints(store: ObjectStore) -> dict[str, str]:
    """Per style under incoming/: a fingerprint of its files, so a change re-ingests it."""
    digests: dict[str, hashlib._Hash] = {}
    for info in store.list(INCOMING_PREFIX):
        name, _, rest = info.key[len(INCOMING_PREFIX) :].partition("/")
        try:
            validate_style(name)
        except InvalidStyleName:
            continue
        if in_api_upload(rest):  # an API upload becomes a dataset by its own `complete`, never half-done
            continue
        digests.setdefault(name, hashlib.sha256()).update(f"{info.key}:{info.etag}\n".encode())
    return {style: digest.hexdigest()[:16] for style, digest in digests.items()}


@dg.sensor(
    job=train_lora,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Turn on to train automatically: each new dataset version starts train_lora "
    "for its style (once per dataset hash). Declared styles follow their defs.yaml instead "
    "(their own <style>_training_sensor).",
)
def new_dataset_version_sensor(
    context: dg.SensorEvaluationContext, declared_styles: dg.ResourceParam[DeclaredStyles]
) -> dg.SensorResult:
    return _new_version_requests(context, lambda style: style not in declared_styles)


def declared_style_training_sensor(style: str) -> dg.SensorDefinition:
    """Trains each new dataset version of ``style``, whose defs.yaml says
    ``automation: on_new_dataset_version``: running from the start, one per declared style."""

    @dg.sensor(
        name=f"{dagster_name(style)}_training_sensor",
        # By name: Dagster copies what a defs.yaml builds, and a copy of the job would clash.
        job_name=train_lora.name,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Trains each new dataset version of {style} (its LoraTraining defs.yaml: "
        "automation: on_new_dataset_version), once per dataset hash.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return _new_version_requests(context, lambda partition: partition == style)

    return _sensor


def dagster_name(style: str) -> str:
    """``style`` as part of a Dagster object's name (letters, digits and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", style)


def _new_version_requests(context: dg.SensorEvaluationContext, trains: Callable[[str], bool]) -> dg.SensorResult:
    """A train_lora run per new ``training_dataset`` materialization of a style ``trains`` accepts.

    The sensors share this, each with its own cursor: a declared style is trained by its
    declaration's sensor alone, any other style by the switch a user turns on.
    """
    records = context.instance.fetch_materializations(
        dg.AssetKey("training_dataset"), limit=100, cursor=context.cursor, ascending=True
    )
    requests = []
    for record in records.records:
        event = record.asset_materialization
        if event is None or event.partition is None or not trains(event.partition):
            continue
        dataset_hash = _metadata_text(event.metadata.get("dataset_hash"))
        if dataset_hash:
            requests.append(
                dg.RunRequest(run_key=f"train:{event.partition}:{dataset_hash}", partition_key=event.partition)
            )
    return dg.SensorResult(run_requests=requests, cursor=records.cursor)


def _metadata_text(value) -> str | None:
    return None if value is None else str(getattr(value, "value", value))
