"""Pairing images with captions: sidecar ``.txt`` files, ``metadata.jsonl``, ``captions.csv``.

The conventions are the ones training tools already use: kohya-style sidecars
(``cat_01.png`` + ``cat_01.txt``) and Hugging Face ``imagefolder`` metadata
(a ``file_name`` column, names relative to the metadata file's folder, the
caption under ``text``, ``caption`` or ``prompt``). A sidecar wins over a
metadata row for the same image. Pure functions: names and bytes in, captions
and problems out.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from lora_pipeline.dataset.sources import Refusal
from lora_pipeline.dataset.validate import CaptionError, decode_caption, decode_text_file, normalise_caption

CAPTION_SUFFIX = ".txt"
METADATA_FILES = ("metadata.jsonl", "captions.csv")
FILE_COLUMNS = ("file_name", "filename", "file", "image", "path")
CAPTION_COLUMNS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Caption:
    """A caption found for an image, where it came from, and any reading note."""

    text: str
    origin: str  # "sidecar" | "metadata.jsonl" | "captions.csv"
    note: str | None = None


@dataclass
class CaptionIndex:
    """Captions by image name (sidecars by stem), plus unreadable caption files."""

    sidecars: dict[str, Caption | CaptionError] = field(default_factory=dict)
    rows: dict[str, Caption] = field(default_factory=dict)
    problems: list[Refusal] = field(default_factory=list)

    def lookup(self, image_name: str) -> Caption | CaptionError | None:
        sidecar = self.sidecars.get(stem_key(image_name))
        if sidecar is not None:
            return sidecar
        return self.rows.get(image_name)


def stem_key(name: str) -> str:
    """``a/b/cat_01.png`` → ``a/b/cat_01``: the key a sidecar caption is found under."""
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else str(path)


def is_caption_file(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() == CAPTION_SUFFIX


def is_metadata_file(name: str) -> bool:
    return PurePosixPath(name).name.lower() in METADATA_FILES


def build_caption_index(
    sidecar_files: dict[str, bytes],
    metadata_files: dict[str, bytes],
    *,
    allow_legacy_encodings: bool = True,
) -> CaptionIndex:
    """Read every caption source once; unreadable ones become per-image errors or problems."""
    index = CaptionIndex()
    for name, data in sorted(sidecar_files.items()):
        try:
            caption = decode_caption(data, allow_legacy_encodings=allow_legacy_encodings, name=name)
            index.sidecars[stem_key(name)] = Caption(
                caption.text, "sidecar", caption.note and f"{name}: {caption.note}"
            )
        except CaptionError as exc:
            index.sidecars[stem_key(name)] = exc
    for name, data in sorted(metadata_files.items()):
        try:
            decoded = decode_text_file(data, allow_legacy_encodings=allow_legacy_encodings, name=name)
        except CaptionError as exc:
            index.problems.append(Refusal(name, str(exc)))
            continue
        base = PurePosixPath(name).parent
        parse = parse_metadata_jsonl if name.lower().endswith(".jsonl") else parse_captions_csv
        rows, problems = parse(decoded.text, source_name=name)
        origin = PurePosixPath(name).name.lower()
        for file_name, text in rows.items():
            image = str(base / file_name) if str(base) != "." else file_name
            note = decoded.note and f"{name}: {decoded.note}"
            index.rows.setdefault(image, Caption(text, origin, note))
        index.problems.extend(problems)
    return index


def parse_metadata_jsonl(text: str, *, source_name: str = "metadata.jsonl") -> tuple[dict[str, str], list[Refusal]]:
    """One JSON object per line with a file column and a caption column."""
    rows: dict[str, str] = {}
    problems: list[Refusal] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source_name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Refusal(where, f"not valid JSON ({exc.msg}); line ignored"))
            continue
        if not isinstance(record, dict):
            problems.append(Refusal(where, "not a JSON object; line ignored"))
            continue
        _add_row(record, where, rows, problems)
    return rows, problems


def parse_captions_csv(text: str, *, source_name: str = "captions.csv") -> tuple[dict[str, str], list[Refusal]]:
    """A header row naming a file column and a caption column, then one row per image."""
    rows: dict[str, str] = {}
    problems: list[Refusal] = []
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not any(c in header for c in FILE_COLUMNS) or not any(c in header for c in CAPTION_COLUMNS):
        problems.append(
            Refusal(
                source_name,
                f"header {reader.fieldnames!r} lacks a file column ({'/'.join(FILE_COLUMNS)}) "
                f"or a caption column ({'/'.join(CAPTION_COLUMNS)}); file ignored",
            )
        )
        return rows, problems
    for number, record in enumerate(reader, start=2):
        cleaned = {(k or "").strip().lower(): v for k, v in record.items()}
        _add_row(cleaned, f"{source_name}:{number}", rows, problems)
    return rows, problems


def _add_row(record: dict[str, Any], where: str, rows: dict[str, str], problems: list[Refusal]) -> None:
    file_name = next((record[c] for c in FILE_COLUMNS if isinstance(record.get(c), str)), None)
    caption = next((record[c] for c in CAPTION_COLUMNS if isinstance(record.get(c), str)), None)
    if not file_name:
        problems.append(Refusal(where, f"no file column ({'/'.join(FILE_COLUMNS)}); row ignored"))
        return
    file_name = file_name.strip().replace("\\", "/").removeprefix("./")
    if caption is None:
        problems.append(
            Refusal(where, f"no caption column ({'/'.join(CAPTION_COLUMNS)}) for {file_name!r}; row ignored")
        )
        return
    if file_name in rows:
        problems.append(Refusal(where, f"second row for {file_name!r}; the first one is used"))
        return
    rows[file_name] = normalise_caption(caption)
