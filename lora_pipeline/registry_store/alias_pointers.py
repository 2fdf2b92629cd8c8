"""A stable published key per alias: ``loras/<style>/<style>@<alias>.json``.

An app that loads "the production LoRA of style_59" reads this one fixed key (or its public
URL) and follows every promote, rollback and removal, as MLflow's ``models:/name@alias`` does,
without reading the registry document. The pointer names the version, its file in every layout
(key and URL) and the alias move that set it (``seq``, ``since``, ``by``); after a removal it
says ``"version": null``.

Written after the registry document (the truth), by a conditional write that never replaces a
pointer from a later move (``seq``): two movers racing, or a slow one, leave the newest. A
crash between the two writes leaves the pointer behind its document; ``registry reconcile``
publishes it again (``publish_alias_pointers`` for every style with aliases).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from lora_pipeline.registry.models import RegistryDocument
from lora_pipeline.registry_store.index import AliasPointer
from lora_pipeline.storage.base import ObjectStore, StoredObject
from lora_pipeline.storage.documents import dump_json, update_object
from lora_pipeline.storage.keys import alias_pointer_key

POINTER_SCHEMA_VERSION = 1


def pointer_document(document: RegistryDocument, alias: str, primary: str) -> dict[str, Any] | None:
    """The pointer of ``alias`` as ``document`` has it (None: the alias was never set)."""
    last = next((e for e in reversed(document.alias_history) if e.alias == alias), None)
    if last is None:
        return None
    name = document.aliases.get(alias)
    pointer = AliasPointer.of(document, alias, name, primary) if name else None
    body: dict[str, Any] = {"version": None, "loraUrl": None, "s3Key": None, "files": {}}
    if pointer is not None:
        body = pointer.to_dict()
    return {
        "schemaVersion": POINTER_SCHEMA_VERSION,
        "style": document.style,
        "alias": alias,
        **body,
        "seq": last.seq,
        "since": last.at,
        "by": last.by,
        "action": last.action,
    }


def publish_alias_pointers(
    store: ObjectStore, document: RegistryDocument, primary: str, aliases: Iterable[str] | None = None
) -> list[str]:
    """Write the pointer of each of ``aliases`` (default: every alias the history names) that
    differs from what ``document`` says, never over a pointer of a later move. Returns the keys
    written."""
    written = []
    names = sorted(set(aliases) if aliases is not None else {e.alias for e in document.alias_history})
    for alias in names:
        wanted = pointer_document(document, alias, primary)
        if wanted is None:
            continue
        key = alias_pointer_key(document.style, alias)
        if _publish(store, key, dump_json(wanted), wanted["seq"]):
            written.append(key)
    return written


def _publish(store: ObjectStore, key: str, data: bytes, seq: int) -> bool:
    """Write ``data`` at ``key`` unless it is there already or a later move's pointer is; True
    when written."""
    wrote = False

    def newer(current: StoredObject | None) -> bytes | None:
        nonlocal wrote
        wrote = not (current is not None and (current.data == data or _stored_seq(current) > seq))
        return data if wrote else None

    update_object(store, key, newer, content_type="application/json")
    return wrote


def _stored_seq(current: StoredObject) -> int:
    try:
        seq = json.loads(current.data).get("seq")
    except (ValueError, AttributeError):
        return -1  # unreadable: replace it
    return seq if isinstance(seq, int) else -1
