"""``registry_change_sensor``: alias moves and deletions made anywhere show in the UI.

The ``promote_lora_version`` and ``delete_lora_version`` jobs observe ``lora_registry`` as they
change it; the CLI (``registry promote``, ``rollback``, ``unalias``, ``delete``), reconciliation's
retention and any code calling ``RegistryStore`` directly do not run in Dagster. This sensor
lists the registry documents (one listing), reads those whose ETag changed since its last tick,
and records an observation of ``lora_registry[style]`` when a document's aliases or deleted
versions differ from what the partition's latest event shows (``registry_state``): the UI then
shows the aliases as they are, without a new materialization, and a change a job already
observed is not observed twice.
"""

import json

import dagster as dg

from lora_pipeline.defs.assets.lora_registry import registry_state
from lora_pipeline.defs.outages import store_outage_skip
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.defs.versions import registry_observation
from lora_pipeline.registry.models import RegistryDocument
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import StorageError

REGISTRY_ASSET = dg.AssetKey("lora_registry")
NOTHING_SHOWN = registry_state(RegistryDocument("_"))  # no alias, nothing deleted


def shown_state(instance: dg.DagsterInstance, style: str) -> str | None:
    """The ``registry_state`` of the partition's latest materialization or observation (None: no
    event has one)."""
    records_filter = dg.AssetRecordsFilter(asset_key=REGISTRY_ASSET, asset_partitions=[style])
    records = [
        *instance.fetch_materializations(records_filter, limit=1).records,
        *instance.fetch_observations(records_filter, limit=1).records,
    ]
    if not records:
        return None
    latest = max(records, key=lambda r: r.storage_id)
    event = latest.asset_materialization or latest.asset_observation
    value = event.metadata.get("registry_state") if event is not None else None
    return str(value.value) if value is not None else None


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes lora_registry when a style's aliases or deleted versions change outside a "
    "Dagster run (the CLI, retention, code), so the UI shows them without a new materialization.",
)
def registry_change_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Every 30 s: one listing of ``registry/``, a read of each changed document."""
    partitions = set(context.instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME))
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    events: list[dg.AssetObservation] = []
    try:
        registry = RegistryStore(storage.get_sensor_store())
        for style, etag in sorted(registry.document_etags().items()):
            if style not in partitions or seen.get(style) == etag:
                continue
            document, _ = registry.read(style)
            state, shown = registry_state(document), shown_state(context.instance, style)
            if state != shown and not (shown is None and state == NOTHING_SHOWN):
                events.append(registry_observation(style, document, registry.primary, f"{style}: {state}"))
            seen[style] = etag
    except StorageError as exc:
        return dg.SensorResult(skip_reason=store_outage_skip(exc), cursor=json.dumps(seen, sort_keys=True))
    return dg.SensorResult(
        asset_events=events,
        cursor=json.dumps(seen, sort_keys=True),
        skip_reason=None if events else dg.SkipReason("no alias or deletion to show"),
    )
