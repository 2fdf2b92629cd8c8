"""Style ids, version names and LoRA file names (DESIGN.md, "Names").

The legacy dashboard matched files to versions with ad-hoc regexes and created
duplicates when they missed (`_vV4` vs `_v4`), and a loose prefix match could take
`style_5_vV1` for `style_59`. All of that is decided here, once.
"""

from __future__ import annotations

import re

_STYLE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VERSION_NAME = re.compile(r"[vV]{1,2}([0-9]+)")


class InvalidStyleName(ValueError):
    """A style id outside DESIGN.md's alphabet; the message names the offending value."""


def validate_style(style: str) -> str:
    """Return ``style`` unchanged if it is a safe style id, else raise InvalidStyleName."""
    if not isinstance(style, str) or not _STYLE.fullmatch(style) or ".." in style or style == ".":
        raise InvalidStyleName(
            f"invalid style name {style!r}: use 1 to 64 letters, digits, '_', '-' or '.', never '.' or '..'"
        )
    return style


def version_name(number: int) -> str:
    """``4`` → ``"V4"``."""
    if number < 1:
        raise ValueError(f"version numbers start at 1, got {number}")
    return f"V{number}"


def parse_version_name(name: str) -> int | None:
    """``"V4"``, ``"v4"``, ``"vV4"``, ``"VV4"`` → 4, spaces around it ignored (an operator's
    input); anything else → None."""
    return _version_number(name.strip()) if isinstance(name, str) else None


def _version_number(text: str) -> int | None:
    """The number of a version name exactly as written (a file name's: no spaces forgiven)."""
    match = _VERSION_NAME.fullmatch(text)
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
    return _version_number(tail)


# What the worker appends to a version's file name for the second layout it publishes.
COMPANION_SUFFIXES = ("kohya", "diffusers")
_COMPANION_ENDING = re.compile(r"_[vV]{1,2}[0-9]+_(kohya|diffusers)\.safetensors\Z", re.IGNORECASE)
_COMPANION_ENDINGS = tuple(f"_{suffix}.safetensors" for suffix in COMPANION_SUFFIXES)


def companion_filename(style: str, version_number: int, suffix: str) -> str:
    """``<style>_v<N>_<suffix>.safetensors``: a version's file in its second layout."""
    if suffix not in COMPANION_SUFFIXES:
        raise ValueError(f"unknown companion suffix {suffix!r}; expected one of {COMPANION_SUFFIXES}")
    return f"{validate_style(style)}_v{version_number}_{suffix}.safetensors"


def companion_suffix(name: str) -> str | None:
    """``kohya``/``diffusers`` when a file name (or key, or URL) ends like a version's second
    file (``…_v4_kohya.safetensors``), whatever its style; else None."""
    if not name.lower().endswith(_COMPANION_ENDINGS):  # cheap: this runs once per listed file
        return None
    match = _COMPANION_ENDING.search(name)
    return match.group(1).lower() if match else None


def parse_lora_file(style: str, filename: str) -> tuple[int, str | None] | None:
    """(version number, companion suffix) a file names for ``style``; the suffix is None for a
    version's main file (the one whose arrival completes it), else ``kohya``/``diffusers``.

    ``style_59_v4.safetensors`` → (4, None); ``style_59_v4_kohya.safetensors`` → (4, "kohya");
    every spelling parse_lora_filename accepts works before the suffix too.
    """
    number = parse_lora_filename(style, filename)
    if number is not None:
        return number, None
    suffix = companion_suffix(filename)
    if suffix is None:
        return None
    number = parse_lora_filename(style, filename[: -len(f"_{suffix}.safetensors")] + ".safetensors")
    return (number, suffix) if number is not None else None
