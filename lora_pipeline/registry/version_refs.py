"""A version reference as an app names one: ``V3`` or ``@alias`` (``@production``)."""

from __future__ import annotations

from lora_pipeline.registry.models import RegistryDocument, Version
from lora_pipeline.registry.names import parse_version_name


class UnknownVersionRef(LookupError):
    """The reference names no version of the document; the message says why."""


def resolve_version_ref(document: RegistryDocument, ref: str) -> Version:
    """The version ``ref`` names now: an alias is followed to the version it points at."""
    if ref.startswith("@"):
        alias = ref[1:]
        name = document.aliases.get(alias)
        if name is None:
            known = ", ".join(f"@{a}" for a in sorted(document.aliases)) or "none"
            raise UnknownVersionRef(f"{document.style} has no alias {ref} (aliases: {known})")
        ref = name
    if parse_version_name(ref) is None:
        raise UnknownVersionRef(f"{ref!r} is neither a version name like V3 nor an alias like @production")
    version = document.version(ref)
    if version is None:
        raise UnknownVersionRef(f"{document.style} has no version {ref}")
    return version
