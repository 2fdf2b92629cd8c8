"""How the assets present themselves in the UI: owners, kinds that match the configuration,
and metadata values a browser can open.

Kinds are static, fixed when the definitions load: they come from the settings read then
(``get_settings()``: ``LORA_STORAGE_URL``, ``RUNPOD_ENDPOINT_ID``), so an S3 store shows
``s3`` and a local directory ``file``; a resource overridden in the launchpad does not
change them.
"""

from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import dagster as dg

from lora_pipeline.settings import get_settings, parse_storage_url

OWNERS = ["team:lora"]


def store_kind() -> str:
    """``s3`` for an S3 store, ``file`` for a local directory."""
    return "s3" if parse_storage_url(get_settings().storage_url)[0] == "s3" else "file"


def backend_kind() -> str:
    """``runpod`` when an endpoint is configured, else ``python`` (the local backend's subprocess)."""
    return "runpod" if get_settings().training_backend == "runpod" else "python"


def local_path(url: str) -> str | None:
    """The path of a ``file://`` URL (None for any other URL)."""
    if not url.startswith("file://"):
        return None
    return unquote(urlparse(url).path)


def url_value(url: str | None) -> dg.MetadataValue | str:
    """A URL as metadata: a link for http(s), the path as text for a local file (a browser
    opens no ``file://`` link from a web page), "" when there is none."""
    if not url:
        return ""
    path = local_path(url)
    if path is not None:
        return dg.MetadataValue.path(path)
    return dg.MetadataValue.url(url)


def md_file_link(key: str, url: str | None, label: str | None = None) -> str:
    """A Markdown table cell for a stored file: ``label`` (default its file name), linked when the
    URL opens in a browser (http(s)); the whole key stays in the registry and the trained_lora
    metadata."""
    name = label or PurePosixPath(key).name or key
    if url and not url.startswith("file://"):
        return f"[{name}]({url})"
    return f"`{name}`"
