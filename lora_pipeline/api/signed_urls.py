"""URLs the API serves itself for the local store: what a presigned S3 URL is for S3.

A token carries what the URL allows (the method, the object key, for a PUT the exact size
and content type, an expiry) and an HMAC-SHA256 of it under a key derived from the API
token, so the URL works without the bearer token (a browser PUTs a file to it) and only
for what it was signed for. A restart keeps it valid; changing the API token revokes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass
from typing import Literal


class BadToken(Exception):
    """The token is malformed, forged, expired or for another method; the message says which."""


@dataclass(frozen=True)
class Grant:
    method: Literal["GET", "PUT"]
    key: str
    expires: int
    size: int | None = None
    content_type: str | None = None
    filename: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UrlSigner:
    def __init__(self, api_token: str) -> None:
        self._key = hmac.new(api_token.encode(), b"lora-pipeline api signed urls", hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def token(self, grant: Grant) -> str:
        payload = json.dumps(asdict(grant), sort_keys=True, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def read(self, token: str, method: str, *, now: float | None = None) -> Grant:
        try:
            encoded, mac = token.split(".")
            payload = _unb64(encoded)
            valid = hmac.compare_digest(_unb64(mac), self._mac(payload))
        except ValueError:
            raise BadToken("malformed URL token") from None
        if not valid:
            raise BadToken("URL signature does not match")
        grant = Grant(**json.loads(payload))
        if grant.method != method:
            raise BadToken(f"this URL is for {grant.method}, not {method}")
        if grant.expires <= (time.time() if now is None else now):
            raise BadToken("this URL has expired")
        return grant
