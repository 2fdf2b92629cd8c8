"""What a deployment runs once before it serves, and what moves a laptop's work to Postgres.

Idempotent: every deployment runs it on each start (the Compose init service, the k8s Job,
``make prod-local``), and running it twice, or while the daemon runs, changes nothing twice.

* **Pool limits, set explicitly.** The first use of a pool's *default* limit races on Postgres
  (dagster#33552: simultaneous first claims fail with ``UniqueViolation``), so deploy/dagster.yaml
  has no default limit and every pool a GPU path uses is set here.
* **Style partitions from the store.** Dagster cannot migrate SQLite run history; a new
  instance starts with no dynamic partitions. They are re-created from what the store holds
  (``registry/``, ``datasets/``, ``incoming/``), the same sources ``style_discovery_sensor`` reads,
  with the styles that are partitions whatever the store holds (the sample, every declared one):
  so ``dg launch --partition <style>`` works on an instance no sensor has ticked on yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from lora_pipeline.dataset.versions import current_key, style_folders
from lora_pipeline.defs.assets.training_dataset import INCOMING_PREFIX
from lora_pipeline.defs.completion_sensors import unfinished_jobs
from lora_pipeline.defs.declared_styles import DeclaredStyles, declared_styles
from lora_pipeline.defs.discovery_sensors import always_present_styles
from lora_pipeline.defs.jobs import GPU_POOL
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.storage.keys import DATASETS, REGISTRY, registry_key
from lora_pipeline.webhook.inbox import list_inbox

#: Every pool the project's ops and assets name, and the variable that sets its limit.
POOLS = {GPU_POOL: "LORA_GPU_POOL_LIMIT"}
DEFAULT_POOL_LIMIT = 2
NO_DECLARED_STYLES = declared_styles()


@dataclass
class InitReport:
    pools: dict[str, int] = field(default_factory=dict)
    partitions_added: list[str] = field(default_factory=list)
    partitions_total: int = 0
    unfinished_jobs: int = 0
    inbox_files: int = 0

    def lines(self) -> list[str]:
        pools = ", ".join(f"{k}={v}" for k, v in self.pools.items())
        return [
            f"pool limits: {pools}",
            f"style partitions: {self.partitions_total} ({len(self.partitions_added)} added"
            + (f": {', '.join(self.partitions_added[:20])}" if self.partitions_added else "")
            + ")",
            f"unfinished jobs the job sensor will poll: {self.unfinished_jobs}",
            f"webhook files waiting in the inbox (the webhook sensor applies them): {self.inbox_files}",
        ]


def stored_styles(store: ObjectStore) -> set[str]:
    """Every style the store knows: a registry document, a current dataset, or an incoming drop."""
    styles: set[str] = set()
    for top, document_key in ((REGISTRY, registry_key), (DATASETS, current_key)):
        for style in style_folders(store, top):
            if store.head(document_key(style)) is not None:
                styles.add(style)
    for name in store.list_prefixes(INCOMING_PREFIX):
        name = name[len(INCOMING_PREFIX) :].strip("/")
        try:
            styles.add(validate_style(name))
        except InvalidStyleName:
            continue
    return styles


def set_pool_limits(instance: dg.DagsterInstance, limits: dict[str, int]) -> None:
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def init_instance(
    instance: dg.DagsterInstance,
    store: ObjectStore,
    pool_limits: dict[str, int],
    declared: DeclaredStyles = NO_DECLARED_STYLES,
) -> InitReport:
    report = InitReport(pools=dict(pool_limits))
    set_pool_limits(instance, pool_limits)
    known = set(instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME))
    styles = stored_styles(store) | always_present_styles(declared)
    new = sorted(styles - known)
    if new:
        instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, new)
    report.partitions_added = new
    report.partitions_total = len(known | styles)
    report.unfinished_jobs = len(unfinished_jobs(RegistryStore(store)))
    report.inbox_files = sum(1 for _ in list_inbox(store))
    return report
