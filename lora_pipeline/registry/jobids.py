"""RunPod job ids: the base UUID is the identity, the suffix is decoration.

RunPod returns ids like ``60902e6c-…-5e2b-u1`` with a varying suffix (``-e1``,
``-e2``, ``-u1``…). Webhooks and status answers may name the id with or without
it. The legacy system compared whole strings and lost completions; we compare
the base UUID and store the id exactly as RunPod returned it.
"""

from __future__ import annotations

import re

_ID = re.compile(
    r"(?P<base>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"(?:-(?P<suffix>[A-Za-z]+[0-9]+))?"
)


def base_job_id(job_id: str) -> str:
    """The UUID part of a RunPod id, lowercased; ids that are not UUID-shaped are kept whole."""
    match = _ID.fullmatch(job_id.strip())
    return match.group("base").lower() if match else job_id.strip()


def job_id_suffix(job_id: str) -> str | None:
    """``"e2"`` for ``…-e2``; None when the id has no suffix."""
    match = _ID.fullmatch(job_id.strip())
    return match.group("suffix") if match else None


def same_job(a: str, b: str) -> bool:
    """Whether two ids name the same RunPod job, suffixes aside."""
    return base_job_id(a) == base_job_id(b)
