"""Where the pipeline's use cases read the time and wait: the system's clock, or another.

The submit path, the registry's conditional writes (their back-off on a lost race),
reconciliation and the version retention all read "now" and sometimes wait. They take
a ``Clock`` (default ``SYSTEM_CLOCK``) rather than calling ``datetime.now`` and
``time.sleep`` themselves, so a deterministic simulation (lora_pipeline_tests/sim/)
can run the same code on simulated time, with skew between actors and no real sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["SYSTEM_CLOCK", "Clock"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Clock:
    """``now`` (timezone-aware wall time), ``monotonic`` (seconds, for deadlines) and ``sleep``."""

    now: Callable[[], datetime] = _utc_now
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()
