"""Dataset decoding, captions and bucketing: pure rules, checked without a model."""

from __future__ import annotations

import pytest

from lora_pipeline.worker.data import (
    assign_bucket,
    batches_per_epoch,
    decode_image,
    epoch_batches,
    fetch_examples,
    load_manifest,
    make_buckets,
    resize_and_crop,
    tag_frequency,
    with_trigger,
)
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline_tests.worker.conftest import STYLE, png_bytes, put_dataset


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a red circle", "geoshapes style", "geoshapes style, a red circle"),
        ("Geoshapes Style, a red circle", "geoshapes style", "Geoshapes Style, a red circle"),
        ("a red circle", None, "a red circle"),
        ("", "geo", "geo"),
    ],
    ids=["prefixed", "already-there", "no-trigger", "empty-caption"],
)
def test_trigger_word_is_prefixed_once(caption: str, trigger: str | None, expected: str) -> None:
    assert with_trigger(caption, trigger) == expected


def test_tag_frequency_counts_comma_separated_tags() -> None:
    assert tag_frequency(["geo, red circle", "geo, blue square"]) == {"blue square": 1, "geo": 2, "red circle": 1}


def test_buckets_keep_about_the_requested_area_within_aspect_limits() -> None:
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert max(width / height, height / width) <= 2.0


def test_wide_and_tall_images_go_to_matching_buckets() -> None:
    buckets = make_buckets(512)
    wide = assign_bucket((1600, 900), buckets)
    tall = assign_bucket((900, 1600), buckets)
    assert wide[0] > wide[1] and tall[1] > tall[0]
    assert assign_bucket((700, 700), buckets) == (512, 512)


def test_resize_and_crop_fills_the_bucket_exactly() -> None:
    from PIL import Image

    crop, (top, left) = resize_and_crop(Image.new("RGB", (300, 100)), (128, 64))
    assert crop.size == (128, 64)
    assert top == 0 and left > 0


def test_epoch_batches_cover_every_image_once_and_stay_in_one_bucket() -> None:
    buckets = [(64, 64)] * 5 + [(96, 48)] * 3
    batches = epoch_batches(buckets, 2, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert len(batches) == batches_per_epoch(buckets, 2) == 5


def test_epoch_batches_are_a_function_of_seed_and_epoch() -> None:
    buckets = [(64, 64)] * 8
    assert epoch_batches(buckets, 3, seed=5, epoch=2) == epoch_batches(buckets, 3, seed=5, epoch=2)
    assert epoch_batches(buckets, 3, seed=5, epoch=2) != epoch_batches(buckets, 3, seed=5, epoch=3)


def test_corrupt_image_is_refused_naming_the_file() -> None:
    with pytest.raises(WorkerInputError, match=r"corrupt image 'broken\.png'"):
        decode_image(png_bytes((1, 2, 3))[:40], "broken.png")


def test_dataset_without_images_is_refused(store) -> None:
    digest = put_dataset(store, [])
    with pytest.raises(WorkerInputError, match="no images"):
        load_manifest(store, STYLE, digest)


def test_missing_dataset_names_the_hash(store) -> None:
    with pytest.raises(WorkerInputError, match="dataset_hash: no dataset abcdef12"):
        load_manifest(store, STYLE, "abcdef12")


def test_fetched_examples_carry_captions_and_rgb_pixels(store) -> None:
    digest = put_dataset(store, [("a.png", png_bytes((200, 0, 0)), "a red square")])
    [example] = fetch_examples(store, load_manifest(store, STYLE, digest), STYLE, digest)
    assert example.caption == "a red square" and example.image.mode == "RGB"
    assert example.image.getpixel((0, 0)) == (200, 0, 0)
