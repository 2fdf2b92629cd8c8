"""The model card of a version, stored beside its files (``registry/cards.py`` writes the text)."""

from __future__ import annotations

from lora_pipeline.registry.cards import model_card
from lora_pipeline.registry.models import RegistryDocument, Version
from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.storage.keys import model_card_key


def publish_model_card(store: ObjectStore, document: RegistryDocument, version: Version) -> tuple[str, str]:
    """Write ``version``'s card (``loras/<style>/<style>_v<N>.md``) when it differs from the stored
    one; returns (key, Markdown). Called when a version is recorded and when its samples change."""
    key = model_card_key(document.style, version.number)
    text = model_card(document, version)
    stored = store.head(key)
    if stored is None or store.get(key).data != text.encode():
        store.put(key, text.encode(), content_type="text/markdown; charset=utf-8")
    return key, text
