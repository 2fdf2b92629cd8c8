"""Small, deterministic files for dataset tests: images, bombs, zips, caption bytes."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image


def image_bytes(
    size: tuple[int, int] = (96, 80), colour: tuple[int, int, int] = (200, 40, 40), fmt: str = "PNG", **save
) -> bytes:
    """A flat-colour image with a corner mark (so two colours give two different files)."""
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (colour[2], colour[0], colour[1]))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def jpeg_with_orientation(size: tuple[int, int], orientation: int) -> bytes:
    image = Image.new("RGB", size, (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000, *, full: bool = False) -> bytes:
    """A valid PNG header claiming width×height over a tiny IDAT: a few hundred bytes.

    Decoding it would need width*height*3 bytes (1.2 GB for 20000²); only a
    check of the header's size keeps that from happening. ``full``: every row is in the
    IDAT (zeros compress about 1000:1), so a decode really fills width*height*3 bytes;
    compressed row by row, never holding the image in memory here.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (width * 3)
    if full:
        packer = zlib.compressobj(9)
        idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    else:
        idat = zlib.compress(row * 4, 9)  # a few rows; the rest "missing" — never read
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_files(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return root


def write_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    """A zip with members named exactly as given (``../`` and absolute names included)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            archive.writestr(info, content.encode("utf-8") if isinstance(content, str) else content)
    return path


def good_images(n: int, *, start: int = 0, size: tuple[int, int] = (96, 80)) -> dict[str, bytes | str]:
    """``n`` distinct captioned images, img_000.png + img_000.txt …"""
    files: dict[str, bytes | str] = {}
    for i in range(start, start + n):
        files[f"img_{i:03d}.png"] = image_bytes(size, (i * 37 % 256, 90, 200 - i % 200))
        files[f"img_{i:03d}.txt"] = f"teststyle, picture number {i}"
    return files
