"""Errors the worker reports as a job's ``error``.

A ``WorkerInputError`` is the request's or the data's fault (retrying will not
help); the handler turns it into ``{"error": ...}`` before any GPU time is spent
where it can. Anything else escaping training is a worker fault.
"""

from __future__ import annotations


class WorkerInputError(ValueError):
    """Bad request, base model or dataset; the message names what is wrong."""
