"""Store wrappers that fail on demand, for "the store is down" paths."""

from __future__ import annotations

from typing import Any

from lora_pipeline.storage.base import StoreUnavailable


class FailingStore:
    """Delegates to ``inner`` but raises StoreUnavailable for writes while ``failing``.

    ``fail_keys_with`` narrows the failure to keys starting with that prefix, so a
    test can fail the body write but not the claim (a crash between the two).
    """

    def __init__(self, inner: Any, *, fail_keys_with: str = "") -> None:
        self.inner = inner
        self.failing = True
        self.fail_keys_with = fail_keys_with
        self.puts = 0

    def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        if self.failing and key.startswith(self.fail_keys_with):
            raise StoreUnavailable(f"store down (test) writing {key}")
        self.puts += 1
        return self.inner.put(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
