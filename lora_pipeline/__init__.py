"""lora_pipeline: the whole life of style LoRAs as a Dagster data pipeline.

``lora_pipeline.LoraTraining`` names the component that declares a style in a ``defs.yaml``
(docs/dg.md). It is imported on first use only: the GPU worker imports this package too, and it
has no Dagster installed.
"""

from typing import Any

__all__ = ["LoraTraining"]


def __getattr__(name: str) -> Any:
    if name == "LoraTraining":
        from lora_pipeline.defs.lora_training import LoraTraining

        return LoraTraining
    raise AttributeError(f"module 'lora_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy name too: dg's registry lists a module's component types from its dir()."""
    return sorted([*globals(), *__all__])
