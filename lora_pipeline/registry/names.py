"""Style ids, version names and LoRA file names (DESIGN.md, "Names").

The legacy dashboard matched files to versions with ad-hoc regexes and created
duplicates when they missed (`_vV4` vs `_v4`), and a loose prefix match could take
`style_5_vV1` for `style_59`. All of that is decided here, once.
"""

from __future__ import annotations

import re

_STYLE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_VERSION_NAME = re.compile(r"^[vV]{1,2}(\d+)$")


class InvalidStyleName(ValueError):
    """A style id outside DESIGN.md's alphabet; the message names the offending value."""


def validate_style(style: str) -> str:
    """Return ``style`` unchanged if it is a safe style id, else raise InvalidStyleName."""
    if not isinstance(style, str) or not _STYLE.match(style) or ".." in style:
        raise InvalidStyleName(
            f"invalid style name {style!r}: use 1 to 64 letters, digits, '_', '-' or '.', "
            "never '..'"
        )
    return style


def version_name(number: int) -> str:
    """``4`` → ``"V4"``."""
    if number < 1:
        raise ValueError(f"version numbers start at 1, got {number}")
    return f"V{number}"


def parse_version_name(name: str) -> int | None:
    """``"V4"``, ``"v4"``, ``"vV4"``, ``"VV4"`` → 4; anything else → None."""
    match = _VERSION_NAME.match(name.strip()) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def lora_filename(style: str, version_number: int) -> str:
    """The canonical file name of a version: ``<style>_v<N>.safetensors``."""
    return f"{validate_style(style)}_v{version_number}.safetensors"


def parse_lora_filename(style: str, filename: str) -> int | None:
    """The version number a file names for ``style``, or None if it is not that style's LoRA.

    ``style_59_vV4.safetensors``, ``style_59_v4.safetensors``, ``style_59_VV4…`` and
    ``style_59_vv4…`` all name V4 of ``style_59``; ``style_5_vV1`` is not ``style_59``'s.
    """
    suffix = ".safetensors"
    if not filename.lower().endswith(suffix):
        return None
    stem = filename[: -len(suffix)]
    head, sep, tail = stem.rpartition("_")
    if not sep or head != style:
        return None
    return parse_version_name(tail)
