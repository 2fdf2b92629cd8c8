"""Deciding whether one image or caption may enter a training dataset.

Pure functions over bytes, no storage and no file system: the ingest layer reads
files, these say "accepted, with these facts" or "rejected, for this reason".
Every reason is a sentence a user can act on, because the legacy uploader let
broken files through to fail (or silently degrade) a GPU run hours later.

Decisions worth knowing:

* Stored bytes are never re-encoded: the content hash is of the original file,
  and training decodes it again. Facts (width, height) are measured after the
  EXIF orientation is applied, since that is what training sees.
* A file whose extension lies about its format (a PNG named ``.jpg``) is
  accepted by its real format, stored with the real extension, and noted.
* Size limits are checked from the header before any pixel is decoded, so a
  decompression bomb (a tiny file claiming 20000×20000) costs nothing.
* JPEGs are decoded at a reduced DCT scale (``Image.draft``) by default: libjpeg
  still entropy-decodes the whole stream, so truncation and corruption are
  caught, but the inverse DCT runs on 1/8 of the pixels. That is most of the
  ingest's CPU time on real photos.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Real format (as Pillow names it) → the extension the file is stored under.
FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG from cameras; its first frame is a plain JPEG
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "GIF": "gif",  # a still GIF; animated ones are refused
}
# Extensions a source file may carry to be treated as an image candidate.
IMAGE_EXTENSIONS: dict[str, str] = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
MAX_CAPTION_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """What an acceptable training image looks like."""

    min_side: int = 64
    max_pixels: int = 50_000_000
    reduced_jpeg_decode: bool = True


@dataclass(frozen=True)
class ImageFacts:
    """An accepted image: what the manifest and the report record about it."""

    sha256: str
    size: int
    format: str
    extension: str
    width: int
    height: int
    mode: str
    note: str | None = None
    thumbnail_png: bytes | None = None


@dataclass(frozen=True)
class Rejection:
    """A file that does not enter the dataset, and why (a sentence for the user)."""

    reason: str


def inspect_image(
    data: bytes,
    *,
    name: str,
    limits: ImageLimits = ImageLimits(),
    thumbnail_side: int | None = None,
) -> ImageFacts | Rejection:
    """Decode ``data`` fully enough to trust it, and measure it as training will see it."""
    if not data:
        return Rejection("empty file (0 bytes)")
    sha256 = hashlib.sha256(data).hexdigest()
    header = _read_header(data, limits)
    if isinstance(header, Rejection):
        return header
    decoded = _decode(data, header.format, limits, thumbnail_side)
    if isinstance(decoded, Rejection):
        return decoded
    orientation, mode, rgb = decoded

    width, height = header.width, header.height
    if orientation in _SWAPS_AXES:
        width, height = height, width
    checked = _size_and_name(name, header.format, width, height, limits)
    if isinstance(checked, Rejection):
        return checked
    extension, note = checked
    thumbnail = thumbnail_png(rgb, thumbnail_side) if thumbnail_side else None
    return ImageFacts(
        sha256=sha256,
        size=len(data),
        format="JPEG" if header.format == "MPO" else header.format,
        extension=extension,
        width=width,
        height=height,
        mode=mode,
        note=note,
        thumbnail_png=thumbnail,
    )


@dataclass(frozen=True)
class _Header:
    format: str  # as Pillow names it; one of FORMAT_EXTENSIONS
    width: int  # before the EXIF orientation is applied
    height: int


def _read_header(data: bytes, limits: ImageLimits) -> _Header | Rejection:
    """The real format and size from the header, refused before any pixel is decoded when too
    large (a decompression bomb then costs nothing), of a format not trained on, or animated."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            real_format = probe.format or "unknown"
            header_width, header_height = probe.size
            frames = getattr(probe, "n_frames", 1)
            if real_format in FORMAT_EXTENSIONS:
                _check_pixels(header_width, header_height, limits)
            probe.verify()
    except UnidentifiedImageError:
        return Rejection("not an image Pillow can read (unrecognised or damaged header)")
    except Image.DecompressionBombError as exc:
        return Rejection(f"too large: {exc}; refused before decoding (possible decompression bomb)")
    except _TooLarge as exc:
        return Rejection(str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt"
        return Rejection(f"corrupt image data ({_describe(exc)})")

    if real_format not in FORMAT_EXTENSIONS:
        accepted = ", ".join(sorted({f for f in FORMAT_EXTENSIONS if f != "MPO"}))
        return Rejection(f"{real_format} images are not accepted for training (use {accepted})")
    if frames > 1 and real_format != "MPO":
        return Rejection(f"animated {real_format} ({frames} frames); export a single still frame")
    return _Header(real_format, header_width, header_height)


def _decode(
    data: bytes, real_format: str, limits: ImageLimits, thumbnail_side: int | None
) -> tuple[int, str, Image.Image] | Rejection:
    """Decode every pixel, which is what catches truncated and corrupt data; returns (EXIF
    orientation, mode, a reduced RGB copy oriented as training will see it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if real_format in ("JPEG", "MPO") and limits.reduced_jpeg_decode:
                image.draft("RGB", (thumbnail_side or 1, thumbnail_side or 1))
            image.load()
            orientation = _orientation(image)
            mode = image.mode
            # Orient and normalise as training will (on a reduced copy: cheap,
            # and enough to prove the conversion works for this mode).
            rgb = to_rgb(ImageOps.exif_transpose(_reduced(image, 4 * (thumbnail_side or 64))))
    except Exception as exc:  # noqa: BLE001
        return Rejection(f"corrupt or truncated image data ({_describe(exc)})")
    return orientation, mode, rgb


def recheck_known(
    *, name: str, sha256: str, size: int, width: int, height: int, extension: str, limits: ImageLimits = ImageLimits()
) -> ImageFacts | Rejection:
    """Facts for bytes already decoded and accepted before (same SHA-256), without decoding again.

    Re-ingesting a style mostly sees files its current version already holds;
    identical bytes decode identically, so only this run's size limits are
    applied again, to the measurements recorded then.
    """
    real_format = next((f for f, ext in FORMAT_EXTENSIONS.items() if ext == extension), None)
    if real_format is None:
        raise ValueError(f"unknown stored extension {extension!r}")
    if width * height > limits.max_pixels:
        return Rejection(
            f"too large: {width}×{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,}"
        )
    checked = _size_and_name(name, real_format, width, height, limits)
    if isinstance(checked, Rejection):
        return checked
    return ImageFacts(
        sha256=sha256,
        size=size,
        format=real_format,
        extension=extension,
        width=width,
        height=height,
        mode="",
        note=checked[1],
    )


def _size_and_name(
    name: str, real_format: str, width: int, height: int, limits: ImageLimits
) -> tuple[str, str | None] | Rejection:
    """The shortest-side rule, and the stored extension with a note when the name lies."""
    if min(width, height) < limits.min_side:
        return Rejection(
            f"too small: {width}×{height}, shortest side {min(width, height)} px "
            f"is under the minimum of {limits.min_side} px"
        )
    extension = FORMAT_EXTENSIONS[real_format]
    claimed = IMAGE_EXTENSIONS.get(_suffix(name))
    if claimed is not None and FORMAT_EXTENSIONS.get(claimed) != extension:
        return extension, (
            f"extension {_suffix(name)!r} but the content is {real_format}; "
            f"accepted by its real format and stored as .{extension}"
        )
    return extension, None


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any mode to RGB, putting transparency on white rather than black.

    A plain ``convert("RGB")`` keeps whatever colour hides under transparent
    pixels (often black), which would teach the LoRA black backgrounds.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        ground = Image.new("RGB", rgba.size, (255, 255, 255))
        ground.paste(rgba, mask=rgba.getchannel("A"))
        return ground
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda v: v / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def thumbnail_data_uri(png: bytes) -> str:
    """A ``data:`` URI for a small PNG, what Markdown metadata can show inline."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -- captions -------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionText:
    text: str
    note: str | None = None


class CaptionError(ValueError):
    """A caption file that cannot be read as text; the message says why and what to do."""


_WHITESPACE = re.compile(r"\s+")


def decode_caption(data: bytes, *, allow_legacy_encodings: bool = True, name: str = "caption") -> CaptionText:
    """Caption bytes → one line of text, trying the encodings people really save.

    UTF-8 (with or without BOM) and BOM-marked UTF-16 are read as such; other
    bytes are read as Windows-1252 (then Latin-1) with a note, or refused when
    ``allow_legacy_encodings`` is off, since a wrong guess silently corrupts
    every accented word in the caption.
    """
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(f"{name} is {len(data)} bytes, over the {MAX_CAPTION_BYTES}-byte limit for a caption")
    text, note = _decode_text(data, allow_legacy_encodings=allow_legacy_encodings, name=name)
    return CaptionText(normalise_caption(text), note)


def decode_text_file(data: bytes, *, allow_legacy_encodings: bool = True, name: str = "file") -> CaptionText:
    """A whole text file (metadata.jsonl, captions.csv) decoded with the same rules as captions."""
    text, note = _decode_text(data, allow_legacy_encodings=allow_legacy_encodings, name=name)
    return CaptionText(text, note)


def normalise_caption(text: str) -> str:
    """Strip and fold whitespace (line breaks included) to single spaces."""
    return _WHITESPACE.sub(" ", text).strip()


def _decode_text(data: bytes, *, allow_legacy_encodings: bool, name: str) -> tuple[str, str | None]:
    if data.startswith(b"\xef\xbb\xbf"):
        return _strict(data, "utf-8-sig", name), None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return _strict(data, "utf-16", name), "decoded as UTF-16 (byte-order mark)"
    if b"\x00" in data:
        # UTF-16 without a BOM: every other byte is zero for Latin text.
        encoding = "utf-16-le" if data[1::2].count(0) > data[0::2].count(0) else "utf-16-be"
        try:
            return data.decode(encoding), f"decoded as {encoding.upper()} (no byte-order mark)"
        except UnicodeDecodeError:
            raise CaptionError(f"{name} holds binary data (NUL bytes), not text") from None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        problem = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        if not allow_legacy_encodings:
            raise CaptionError(f"{name} is not valid UTF-8 ({problem}); save it as UTF-8") from None
    for legacy in ("cp1252", "latin-1"):
        try:
            return data.decode(legacy), f"not valid UTF-8 ({problem}); decoded as {legacy}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _strict(data: bytes, encoding: str, name: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"{name} starts with a {encoding} byte-order mark but is not valid {encoding} ({exc.reason})"
        ) from None


# -- helpers --------------------------------------------------------------------


class _TooLarge(Exception):
    pass


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise _TooLarge(
            f"too large: header claims {width}×{height} = {width * height:,} pixels, over the "
            f"limit of {limits.max_pixels:,}; refused before decoding (possible decompression bomb)"
        )


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1


def _reduced(image: Image.Image, side: int) -> Image.Image:
    factor = max(image.size) // side
    return image.reduce(factor) if factor >= 2 else image


def thumbnail_png(image: Image.Image, side: int) -> bytes:
    """``image`` scaled down to ``side`` px on its longer side, as an optimised PNG."""
    small = image.copy()
    small.thumbnail((side, side))
    out = io.BytesIO()
    small.save(out, "PNG", optimize=True)
    return out.getvalue()


def _suffix(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."
