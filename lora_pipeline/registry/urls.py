"""Which URL to record for a LoRA file, and which never to record.

The legacy sync replaced fast accelerated URLs with regular ones and stored
presigned links that expired an hour later. Here a URL gets a rank, the merge
keeps the highest one it has seen for a version, and a presigned URL is reduced
to its stable form before it can reach a document.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum
from urllib.parse import parse_qsl, urlsplit, urlunsplit

_SIGNING_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-expires",
        "x-amz-security-token",
        "signature",
        "expires",
        "awsaccesskeyid",
    }
)


class UrlRank(IntEnum):
    """Higher is better. A lower rank never replaces a higher one."""

    INVALID = -1
    LOCAL = 0  # file:// (a laptop store)
    PATH_STYLE = 1  # https://s3.<region>.amazonaws.com/<bucket>/<key>, any endpoint + /bucket/
    REGULAR = 2  # https://<bucket>.s3.<region>.amazonaws.com/<key>
    ACCELERATED = 3  # s3-accelerate, CloudFront, or a CDN named by LORA_PUBLIC_BASE_URL


def is_presigned(url: str) -> bool:
    """Whether ``url`` carries a signature or an expiry (SigV4 or SigV2 query)."""
    query = urlsplit(url).query
    return any(name.lower() in _SIGNING_PARAMS for name, _ in parse_qsl(query, keep_blank_values=True))


def stable_url(url: str | None) -> str | None:
    """``url`` without a presigning query (the object's plain URL), or None if unusable.

    The plain URL still names the file, so a legacy record that held a presigned
    link keeps the information, minus the part that expires.
    """
    if not url or not isinstance(url, str):
        return None
    url = url.strip()
    if "?" not in url and url.startswith(("https://", "http://", "file://")) and " " not in url:
        return url  # the common case, without parsing (this runs once per file)
    if url_rank(url) is UrlRank.INVALID:
        return None
    if "?" in url and is_presigned(url):
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return url


def url_rank(url: str) -> UrlRank:
    """Classify a URL by how it serves the file (see UrlRank).

    Hosts that are neither S3 endpoints nor local addresses are taken to be a
    CDN: that is what LORA_PUBLIC_BASE_URL names. (Parsed by hand: this runs for
    every file of a reconciliation, and urlsplit dominated the merge's profile.)
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        return UrlRank.INVALID
    if scheme == "file":
        return UrlRank.LOCAL
    netloc = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    host = netloc[1:].partition("]")[0] if netloc.startswith("[") else netloc.partition(":")[0]
    host = host.lower()
    if scheme not in ("http", "https") or not host or " " in host:
        return UrlRank.INVALID
    if "s3-accelerate" in host or host.endswith(".cloudfront.net"):
        return UrlRank.ACCELERATED
    if host.endswith(".amazonaws.com"):
        first = host.split(".", 1)[0]
        if first == "s3" or first.startswith("s3-"):
            return UrlRank.PATH_STYLE
        return UrlRank.REGULAR
    if host == "localhost" or _is_ip(host) or host.split(".", 1)[0].startswith("s3"):
        return UrlRank.PATH_STYLE  # an S3-compatible endpoint: bucket in the path
    return UrlRank.ACCELERATED


def url_sort_key(url: str | None) -> tuple[int, str]:
    """Order for choosing between URLs: rank first, then the text (deterministic)."""
    if url is None:
        return (-2, "")
    return (int(url_rank(url)), url)


def _is_ip(host: str) -> bool:
    if not (":" in host or host.replace(".", "").isdigit()):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
