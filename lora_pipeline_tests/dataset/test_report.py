"""Statistics and asset-check helpers over a manifest."""

from __future__ import annotations

from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, RejectedFile, dataset_hash
from lora_pipeline.dataset.report import check_caption_coverage, check_min_images, dataset_stats, rejected_markdown


def _entry(i: int, w: int, h: int, caption_source: str = "sidecar") -> ImageEntry:
    return ImageEntry(
        file=f"images/{i:064x}.png",
        sha256=f"{i:064x}",
        width=w,
        height=h,
        size=1000,
        caption="c",
        source=f"{i}.png",
        caption_source=caption_source,
    )


def _manifest(entries: list[ImageEntry]) -> DatasetManifest:
    return DatasetManifest(style="s", dataset_hash=dataset_hash(entries), created_at="t", images=entries)


def test_stats_bucket_images_by_shortest_side() -> None:
    stats = dataset_stats([_entry(0, 100, 900), _entry(1, 512, 768), _entry(2, 3000, 2500), _entry(3, 512, 512)])
    assert stats.side_buckets == {"<256": 1, "512–767": 2, "≥2048": 1}
    assert stats.top_resolutions["512x512"] == 1 and stats.total_bytes == 4000
    assert (stats.min_side, stats.max_side) == (100, 3000)


def test_min_images_check_fails_below_the_threshold() -> None:
    manifest = _manifest([_entry(i, 64, 64) for i in range(4)])
    assert check_min_images(manifest, 4).passed
    outcome = check_min_images(manifest, 5)
    assert not outcome.passed and "4 accepted images" in outcome.description


def test_caption_coverage_counts_filled_captions_as_missing() -> None:
    manifest = _manifest([_entry(0, 64, 64), _entry(1, 64, 64, "trigger_word")])
    assert check_caption_coverage(manifest, 0.5).passed
    outcome = check_caption_coverage(manifest, 0.9)
    assert not outcome.passed and outcome.metadata["caption_coverage"] == 0.5


def test_rejected_markdown_escapes_table_pipes() -> None:
    text = rejected_markdown([RejectedFile(source="a|b.png", reason="bad | worse")])
    assert "a\\|b.png" in text and "bad \\| worse" in text
