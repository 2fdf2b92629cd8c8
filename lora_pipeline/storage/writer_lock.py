"""Registry writers on a store that ignores conditional writes: refused, or serialized by a lock.

Every shared document (the registry documents, their index, a dataset's ``current.json``)
is updated by an optimistic read-modify-write whose write is conditional (If-Match /
If-None-Match). Some S3-compatible endpoints accept those headers and ignore them; the
store's start-up probe finds that out (``supports_conditional_writes`` False). There a
HEAD-then-PUT can check the condition but not atomically, so two writers of one document
would lose an update. ``serialized_writes`` therefore refuses such a write with one line,
unless the operator set ``LORA_WRITER_LOCK_DIR``: then each document's writers take an
exclusive ``flock`` on its lock file in that folder for the whole read-modify-write, which
holds only if every writer (Dagster daemon, runs, the CLI) runs on the host that folder is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.local import lock_file_name, locked_file


class WritersNotSerialized(StorageError):
    """A shared document would be written where conditional writes are ignored and no lock is set."""


@contextlib.contextmanager
def serialized_writes(store: ObjectStore, key: str) -> Iterator[None]:
    """Run one read-modify-write of ``key`` safely, or raise WritersNotSerialized naming the fix.

    A store that honours conditional writes needs nothing (the write's condition decides);
    one that ignores them needs the writer lock (``LORA_WRITER_LOCK_DIR``)."""
    if getattr(store, "supports_conditional_writes", True):
        yield
        return
    lock_dir = get_settings().writer_lock_dir
    if not lock_dir:
        raise WritersNotSerialized(
            f"refusing to write {key}: the store {store.describe()} ignores conditional writes "
            "(If-Match / If-None-Match), so concurrent registry writers would lose updates; use an "
            "endpoint that honours them, or set LORA_WRITER_LOCK_DIR to a folder all writers share on one host"
        )
    folder = Path(lock_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WritersNotSerialized(f"cannot use LORA_WRITER_LOCK_DIR={lock_dir}: {exc}") from None
    with locked_file(folder / lock_file_name(key)):
        yield
