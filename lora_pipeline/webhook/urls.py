"""The webhook URL the training op gives RunPod, with the shared token in it.

RunPod does not sign webhooks, so the receiver can only recognise a genuine
delivery by a secret RunPod echoes back: the ``token`` query parameter of the URL
it was given at submit time. Keep the URL out of logs.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

WEBHOOK_PATH = "/webhooks/runpod"


def webhook_url(base_url: str, token: str | None) -> str:
    """``https://host/webhooks/runpod`` (or ``LORA_WEBHOOK_URL`` as given) plus ``?token=…``.

    A base URL without a path gets the receiver's route appended.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"webhook base URL must be an http(s) URL, got {base_url!r}")
    path = parts.path if parts.path not in ("", "/") else WEBHOOK_PATH
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"]
    if token:
        query.append(("token", token))
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


def redact(url: str) -> str:
    """The URL with its token replaced, for logs and error messages."""
    parts = urlsplit(url)
    query = [(k, "***" if k == "token" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe="*"), ""))
