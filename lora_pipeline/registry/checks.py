"""Problems an asset check on ``lora_registry`` reports, as pure functions of a document.

Run them on the document as stored (``RegistryStore.read_stored``), not on a
merged one: the merge folds duplicates, which would hide exactly what the checks
are there to catch in a file someone else wrote.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from lora_pipeline.registry.layouts import LAYOUTS
from lora_pipeline.registry.models import InvalidRecord, RegistryDocument, VersionStatus
from lora_pipeline.registry.urls import is_presigned


def duplicate_names(doc: RegistryDocument) -> list[str]:
    """Version names held by more than one record (folded names count as held)."""
    counts = Counter(n for v in doc.versions for n in v.numbers)
    return [f"{doc.style}: V{n} appears in {c} records" for n, c in sorted(counts.items()) if c > 1]


def duplicate_job_ids(doc: RegistryDocument) -> list[str]:
    """Job ids (compared by base UUID) held by more than one record."""
    counts = Counter(b for v in doc.versions for b in v.job_bases)
    return [f"{doc.style}: job {b} appears in {c} records" for b, c in sorted(counts.items()) if c > 1]


def completed_without_readable_file(doc: RegistryDocument, readable: Callable[[str], bool]) -> list[str]:
    """Completed versions whose file is unknown, or one of whose recorded files (the main one
    and its other layouts) fails ``readable(key)`` (a header read)."""
    problems = []
    for v in doc.versions:
        if v.status is not VersionStatus.completed:
            continue
        if v.s3_key is None:
            problems.append(f"{doc.style} {v.name}: completed but no LoRA file is recorded")
        for key in ([v.s3_key] if v.s3_key else []) + [c.key for c in v.companions]:
            if not readable(key):
                problems.append(f"{doc.style} {v.name}: completed but {key} is missing or unreadable")
    return problems


def completed_without_both_layouts(doc: RegistryDocument) -> list[str]:
    """Completed versions that lack the kohya or the diffusers file (a warning: versions
    trained before both were published, or legacy files, have one)."""
    problems = []
    for v in doc.versions:
        if v.status is not VersionStatus.completed or v.file is None:
            continue
        have = v.files()
        missing = [layout for layout in LAYOUTS if layout not in have]
        if missing and v.file.layout is not None:  # an unclassified file is read on the next reconcile
            problems.append(
                f"{doc.style} {v.name}: no {' or '.join(missing)} file (has: {', '.join(sorted(have)) or 'none'})"
            )
    return problems


def stored_presigned_urls(data: bytes) -> list[str]:
    """Records whose ``loraUrl``, or a URL of one of their files, as written in the stored file,
    is presigned (it expires).

    Takes the raw bytes because reading a record already strips a presigned query.
    """
    try:
        raw = json.loads(data)
    except ValueError:
        return []
    records = raw.get("versions") if isinstance(raw, dict) else None
    problems = []
    for r in records or []:
        if not isinstance(r, dict):
            continue
        urls = [("loraUrl", r.get("loraUrl"))]
        if isinstance(r.get("file"), dict):
            urls.append(("file.url", r["file"].get("url")))
        if isinstance(r.get("files"), dict):
            urls += [
                (f"files.{layout}.url", f.get("url")) for layout, f in sorted(r["files"].items()) if isinstance(f, dict)
            ]
        problems += [
            f"{r.get('name')}: {where} is a presigned URL (it expires; store the plain URL)"
            for where, url in urls
            if isinstance(url, str) and is_presigned(url)
        ]
    return problems


def stored_document_problems(data: bytes, style: str, readable: Callable[[str], bool]) -> list[str]:
    """All four checks on a stored document's bytes; an unreadable document is one problem."""
    try:
        doc = RegistryDocument.from_json(data, style)
    except InvalidRecord as exc:
        return [str(exc)]
    return (
        duplicate_names(doc)
        + duplicate_job_ids(doc)
        + completed_without_readable_file(doc, readable)
        + [f"{style} {p}" for p in stored_presigned_urls(data)]
    )
