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


class CountingStore:
    """Delegates to ``inner`` and records each protocol call and how many keys listings yield.

    ``calls`` holds ``(method, key or prefix)``; ``listed`` counts the entries every
    ``list`` / ``list_prefixes`` handed out, so a test can show what a caller's work
    grows with.
    """

    _COUNTED = ("get", "get_range", "head", "put", "delete", "upload_file", "download_file")

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.listed = 0

    def describe(self) -> str:
        return self.inner.describe()

    def list(self, prefix: str = ""):
        self.calls.append(("list", prefix))
        for info in self.inner.list(prefix):
            self.listed += 1
            yield info

    def list_prefixes(self, prefix: str = ""):
        self.calls.append(("list_prefixes", prefix))
        for folder in self.inner.list_prefixes(prefix):
            self.listed += 1
            yield folder

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self._COUNTED:
            return attribute

        def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, key))
            return attribute(key, *args, **kwargs)

        return counted
