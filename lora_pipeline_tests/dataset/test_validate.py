"""Deciding, from bytes alone, whether an image or caption may enter a dataset."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import pytest
from PIL import Image

from lora_pipeline.dataset.validate import (
    CaptionError,
    ImageFacts,
    ImageLimits,
    Rejection,
    decode_caption,
    inspect_image,
    to_rgb,
)
from lora_pipeline_tests.dataset.builders import image_bytes, jpeg_with_orientation, png_bomb


def test_a_good_png_is_accepted_with_its_size_hash_and_format() -> None:
    data = image_bytes((96, 80))
    facts = inspect_image(data, name="a.png")
    assert isinstance(facts, ImageFacts)
    assert (facts.width, facts.height, facts.format, facts.extension) == (96, 80, "PNG", "png")
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert facts.size == len(data)
    assert facts.note is None


def test_a_zero_byte_file_is_rejected_as_empty() -> None:
    assert inspect_image(b"", name="empty.png") == Rejection("empty file (0 bytes)")


@pytest.mark.parametrize("reduced", [True, False])
def test_a_truncated_jpeg_is_rejected_as_truncated(reduced: bool) -> None:
    data = image_bytes((256, 256), fmt="JPEG", quality=95)
    result = inspect_image(data[: len(data) * 2 // 3], name="cut.jpg", limits=ImageLimits(reduced_jpeg_decode=reduced))
    assert isinstance(result, Rejection)
    assert "truncated" in result.reason


def test_a_png_with_a_broken_checksum_is_rejected_as_corrupt() -> None:
    data = bytearray(image_bytes((96, 96)))
    data[data.index(b"IDAT") + 6] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    result = inspect_image(bytes(data), name="broken.png")
    assert isinstance(result, Rejection)
    assert "corrupt" in result.reason


def test_text_with_an_image_extension_is_rejected_as_unreadable() -> None:
    result = inspect_image(b"hello, I am not a picture", name="fake.jpg")
    assert isinstance(result, Rejection)
    assert "not an image" in result.reason


def test_a_png_named_jpg_is_accepted_by_its_real_format_with_a_note() -> None:
    facts = inspect_image(image_bytes((96, 96)), name="really_png.jpg")
    assert isinstance(facts, ImageFacts)
    assert (facts.format, facts.extension) == ("PNG", "png")
    assert facts.note is not None and "'.jpg' but the content is PNG" in facts.note


def test_an_image_under_the_minimum_side_is_rejected_naming_both_sizes() -> None:
    result = inspect_image(image_bytes((200, 40)), name="thin.png", limits=ImageLimits(min_side=64))
    assert isinstance(result, Rejection)
    assert "200×40" in result.reason and "64 px" in result.reason


def test_an_image_over_the_pixel_limit_is_refused_naming_its_size() -> None:
    result = inspect_image(png_bomb(9_000, 9_000), name="huge.png", limits=ImageLimits(max_pixels=50_000_000))
    assert isinstance(result, Rejection)
    assert "9000×9000 = 81,000,000 pixels" in result.reason and "50,000,000" in result.reason


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_bomb(20_000, 20_000)
    assert len(bomb) < 200_000
    result = inspect_image(bomb, name="bomb.png")
    assert isinstance(result, Rejection)
    assert "400000000 pixels" in result.reason and "decompression bomb" in result.reason


# Run in a fresh interpreter: Pillow's pixel buffers live in C, where tracemalloc cannot see
# them, so what counts is the process's peak resident memory (ru_maxrss) around the call.
_PEAK_RSS_CHILD = """
import io, resource, sys
from PIL import Image
from lora_pipeline.dataset import validate
from lora_pipeline_tests.dataset.builders import image_bytes, png_bomb

bomb = png_bomb(4000, 4000, full=True)  # 48 MB of pixels once decoded; built row by row
validate.inspect_image(image_bytes((96, 96)), name="warm.png")  # load Pillow's plugins first
if sys.argv[1] == "decode-first":  # what the test must catch: pixels decoded before the check
    read_header = validate._read_header
    def decode_then_read(data, limits):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return read_header(data, limits)
    validate._read_header = decode_then_read
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = validate.inspect_image(bomb, name="bomb.png", limits=validate.ImageLimits(max_pixels=1_000_000))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert isinstance(result, validate.Rejection) and "16,000,000 pixels" in result.reason, result
print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
"""
_PEAK_LIMIT = 16 * 1024 * 1024  # decoding the bomb takes 48 MB


def _peak_rss_growth(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD, mode], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_a_decompression_bomb_is_refused_without_its_pixels_ever_filling_memory() -> None:
    assert _peak_rss_growth("as-shipped") < _PEAK_LIMIT


def test_the_memory_measurement_sees_a_full_decode_before_the_header_check() -> None:
    """The proof that the test above can fail: the same bomb decoded first grows the peak past it."""
    assert _peak_rss_growth("decode-first") > _PEAK_LIMIT


def test_exif_orientation_swaps_the_measured_width_and_height() -> None:
    facts = inspect_image(jpeg_with_orientation((120, 80), orientation=6), name="rotated.jpg")
    assert isinstance(facts, ImageFacts)
    assert (facts.width, facts.height) == (80, 120)


def test_an_animated_gif_is_rejected() -> None:
    frames = [Image.new("RGB", (96, 96), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    result = inspect_image(out.getvalue(), name="anim.gif")
    assert isinstance(result, Rejection)
    assert "animated" in result.reason


def test_a_thumbnail_is_a_small_rgb_png() -> None:
    facts = inspect_image(image_bytes((300, 200), fmt="JPEG"), name="a.jpg", thumbnail_side=64)
    assert isinstance(facts, ImageFacts) and facts.thumbnail_png
    with Image.open(io.BytesIO(facts.thumbnail_png)) as thumb:
        assert thumb.format == "PNG" and thumb.mode == "RGB" and max(thumb.size) == 64


def test_transparency_becomes_white_not_black_in_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


# -- captions ----------------------------------------------------------------------


def test_a_utf8_caption_is_read_and_whitespace_folded() -> None:
    assert decode_caption("  café,\n  rainy street \n".encode()).text == "café, rainy street"


def test_a_utf8_caption_with_bom_loses_the_bom() -> None:
    result = decode_caption(b"\xef\xbb\xbfcaf\xc3\xa9")
    assert result.text == "café" and result.note is None


def test_a_utf16_caption_with_bom_is_read_with_a_note() -> None:
    result = decode_caption("café".encode("utf-16"))
    assert result.text == "café" and "UTF-16" in (result.note or "")


def test_a_cp1252_caption_is_read_as_cp1252_with_a_note() -> None:
    result = decode_caption("café – naïve".encode("cp1252"))
    assert result.text == "café – naïve"
    assert "not valid UTF-8" in (result.note or "") and "cp1252" in (result.note or "")


def test_a_non_utf8_caption_is_refused_when_legacy_encodings_are_off() -> None:
    with pytest.raises(CaptionError, match=r"x\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        decode_caption("café".encode("latin-1"), allow_legacy_encodings=False, name="x.txt")


def test_binary_junk_in_a_caption_is_refused() -> None:
    with pytest.raises(CaptionError, match="binary"):
        decode_caption(b"\x00\xd8\x00\xdc\x00")


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "I;16"])
def test_images_in_any_common_mode_are_accepted(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = io.BytesIO()
    Image.new(mode, (96, 96)).save(out, fmt)
    facts = inspect_image(out.getvalue(), name=f"x.{fmt.lower()}", thumbnail_side=32)
    assert isinstance(facts, ImageFacts) and facts.mode == mode
    with Image.open(io.BytesIO(facts.thumbnail_png)) as thumb:
        assert thumb.mode == "RGB"
