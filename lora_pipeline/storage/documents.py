"""Small documents updated by several writers at once, without lost updates.

The legacy dashboard saved process status with a plain PUT: two workers reading
the same document and writing back their own change meant one change vanished.
Every shared document here (the registry documents and their index, through
``lora_pipeline.registry_store``) is updated with an optimistic loop: read it with
its ETag, apply a function, write with If-Match (If-None-Match for a new document);
if another writer got there first the write fails with PreconditionFailed and the
loop starts again from the new content. The function must therefore be safe to apply to any newer version
of the document (a merge, not a blind overwrite).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from typing import TypeAlias

from lora_pipeline.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed, StorageError, StoredObject
from lora_pipeline.storage.writer_lock import serialized_writes

JSON = "application/json"

# What json.loads gives back: the type of the documents read_json and update_json hand out.
JsonValue: TypeAlias = dict[str, "JsonValue"] | list["JsonValue"] | str | int | float | bool | None


class TooManyConflicts(StorageError):
    """An optimistic update lost the race more often than its attempt limit allows."""


def read_object(store: ObjectStore, key: str) -> StoredObject | None:
    try:
        return store.get(key)
    except ObjectNotFound:
        return None


def update_object(
    store: ObjectStore,
    key: str,
    fn: Callable[[StoredObject | None], bytes | None],
    *,
    max_attempts: int = 50,
    content_type: str | None = None,
    backoff: float = 0.02,
    sleep: Callable[[float], None] = time.sleep,
) -> StoredObject | None:
    """Apply ``fn`` to the object's current bytes and write the result conditionally.

    ``fn`` gets the current StoredObject (None if absent) and returns the new
    bytes, or None to leave the object as it is. Returns what is stored
    afterwards. Raises TooManyConflicts after ``max_attempts`` lost races. ``sleep`` waits
    between attempts (a simulation passes its own).

    On a store that ignores conditional writes a write runs under ``serialized_writes``
    (the writer lock, or WritersNotSerialized naming the fix); a pass with nothing to
    write needs neither.
    """
    if not getattr(store, "supports_conditional_writes", True):
        current = read_object(store, key)
        new = fn(current)
        if new is None or (current is not None and new == current.data):
            return current
        with serialized_writes(store, key):
            return _update_loop(store, key, fn, max_attempts, content_type, backoff, sleep)
    return _update_loop(store, key, fn, max_attempts, content_type, backoff, sleep)


def _update_loop(
    store: ObjectStore,
    key: str,
    fn: Callable[[StoredObject | None], bytes | None],
    max_attempts: int,
    content_type: str | None,
    backoff: float,
    sleep: Callable[[float], None],
) -> StoredObject | None:
    for attempt in range(max_attempts):
        current = read_object(store, key)
        new = fn(current)
        if new is None or (current is not None and new == current.data):
            return current
        try:
            if current is None:
                etag = store.put(key, new, if_none_match=True, content_type=content_type)
            else:
                etag = store.put(key, new, if_match=current.etag, content_type=content_type)
        except PreconditionFailed:
            # Someone else wrote first: back off a little (jittered) and redo from their version.
            sleep(random.uniform(0, backoff * min(2**attempt, 32)))
            continue
        return StoredObject(key=key, data=new, etag=etag)
    raise TooManyConflicts(f"gave up updating {key!r} after {max_attempts} conflicting writes")


def dump_json(doc: JsonValue) -> bytes:
    """Stable JSON bytes (sorted keys), so an unchanged document is byte-identical."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def read_json(store: ObjectStore, key: str) -> tuple[JsonValue, str | None]:
    """(document, etag), or (None, None) when the key does not exist."""
    current = read_object(store, key)
    if current is None:
        return None, None
    return _load(current), current.etag


def _load(stored: StoredObject) -> JsonValue:
    try:
        doc: JsonValue = json.loads(stored.data)
        return doc
    except ValueError as exc:
        raise StorageError(f"{stored.key!r} is not valid JSON: {exc}") from None


def update_json(
    store: ObjectStore,
    key: str,
    fn: Callable[[JsonValue], JsonValue],
    *,
    max_attempts: int = 50,
) -> JsonValue:
    """Optimistically update a JSON document; returns the document now stored.

    ``fn`` receives a private copy of the current document (None when absent)
    and returns the new document (returning an equal document writes nothing).
    """

    def apply(current: StoredObject | None) -> bytes | None:
        doc = None if current is None else _load(current)
        return dump_json(fn(copy.deepcopy(doc)))

    stored = update_object(store, key, apply, max_attempts=max_attempts, content_type=JSON)
    return None if stored is None else _load(stored)
