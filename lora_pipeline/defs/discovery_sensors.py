"""Discovery sensors: new styles in the store become partitions; new dataset versions can train."""

import hashlib

import dagster as dg

from lora_pipeline.dataset.versions import list_styles
from lora_pipeline.defs.assets.training_dataset import INCOMING_PREFIX, SAMPLE_STYLE
from lora_pipeline.defs.jobs import train_lora
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.storage import StoreUnavailable
from lora_pipeline.storage.registry_io import RegistryStore


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["training_dataset"],
    description="Adds a partition for every style found in the store (incoming/, datasets/, "
    "registry) and ingests styles dropped under incoming/<style>/.",
)
def style_discovery_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    store = storage.get_store()
    try:
        known = set(RegistryStore(store).styles())
        known |= set(list_styles(store))
        incoming = _incoming_fingerprints(store)
    except StoreUnavailable as exc:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"object store unavailable: {exc}"))
    styles = known | set(incoming) | {SAMPLE_STYLE}
    new = sorted(s for s in styles if not context.instance.has_dynamic_partition(STYLES_PARTITIONS_NAME, s))
    requests = [
        dg.RunRequest(run_key=f"incoming:{style}:{fingerprint}", partition_key=style)
        for style, fingerprint in sorted(incoming.items())
    ]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(STYLES_PARTITIONS_NAME, new)] if new else [],
        skip_reason=None if (requests or new) else dg.SkipReason("no new styles"),
    )


def _incoming_fingerprints(store) -> dict[str, str]:
    """Per style under incoming/: a fingerprint of its files, so a change re-ingests it."""
    digests: dict[str, hashlib._Hash] = {}
    for info in store.list(INCOMING_PREFIX):
        name = info.key[len(INCOMING_PREFIX):].split("/", 1)[0]
        try:
            validate_style(name)
        except InvalidStyleName:
            continue
        digests.setdefault(name, hashlib.sha256()).update(f"{info.key}:{info.etag}\n".encode())
    return {style: digest.hexdigest()[:16] for style, digest in digests.items()}


@dg.sensor(
    job=train_lora,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Turn on to train automatically: each new dataset version starts train_lora "
    "for its style (once per dataset hash).",
)
def new_dataset_version_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    records = context.instance.fetch_materializations(
        dg.AssetKey("training_dataset"), limit=100, cursor=context.cursor, ascending=True
    )
    requests = []
    for record in records.records:
        event = record.asset_materialization
        if event is None or event.partition is None:
            continue
        dataset_hash = _metadata_text(event.metadata.get("dataset_hash"))
        if dataset_hash:
            requests.append(
                dg.RunRequest(run_key=f"train:{event.partition}:{dataset_hash}", partition_key=event.partition)
            )
    return dg.SensorResult(run_requests=requests, cursor=records.cursor)


def _metadata_text(value) -> str | None:
    return None if value is None else str(getattr(value, "value", value))
