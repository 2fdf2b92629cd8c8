"""Validation errors in our words: one line that names each bad field and what it got.

Every boundary that validates input with pydantic (a webhook body, a worker's request, a
RunPod answer, a run's training config) reports a refusal through ``describe_validation_error``,
so the messages read alike and never carry pydantic's wording ("Value error, …") or its URLs.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a poisoned input must not flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_validation_error(exc: ValidationError, *, root: str = "body", limit: int = 3) -> str:
    """``field: problem (got value)`` for the first ``limit`` errors, joined by ``; ``.

    ``root`` names the whole input when an error has no field (a body that is not an object).
    A container's value is not repeated (the field's own errors say what is wrong inside it).
    """
    parts = []
    for error in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ())) or root
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        value = error.get("input")
        got = "" if isinstance(value, dict | list) else f" (got {short_repr(value)})"
        parts.append(f"{where}: {message}{got}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
