"""Sensor ticks and schedule evaluations skip, naming the cause, while the store or RunPod is down.

A tick that raises is an error in Dagster's UI and says nothing useful about an
outage; a tick that hangs is cut at 60 s. So every tick gets its store from
``StorageResource.get_sensor_store()`` (tick timeouts, one checked store per
process, behind the breaker) and turns an outage into a ``SkipReason``. What is
not an outage (a bug, a missing object the code did not expect) still raises.
"""

from __future__ import annotations

import dagster as dg

from lora_pipeline.storage.base import StorageError
from lora_pipeline.storage.breaker import is_outage


def store_outage_skip(exc: StorageError) -> dg.SkipReason:
    """The skip for a store outage (open breaker, failing store, failed start-up check);
    re-raises ``exc`` when it is not one (e.g. InvalidKey: a bug to see, not to skip)."""
    if not is_outage(exc):
        raise exc
    return dg.SkipReason(f"object store unavailable: {exc}")
