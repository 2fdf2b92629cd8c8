"""Pairing images with captions from sidecars, metadata.jsonl and captions.csv."""

from __future__ import annotations

from lora_pipeline.dataset.captions import CaptionError, build_caption_index, parse_captions_csv, parse_metadata_jsonl


def test_a_sidecar_caption_is_found_by_the_image_stem_in_its_folder() -> None:
    index = build_caption_index({"sub/cat.txt": b"a cat"}, {})
    assert index.lookup("sub/cat.png").text == "a cat"
    assert index.lookup("cat.png") is None


def test_metadata_jsonl_names_are_relative_to_its_folder() -> None:
    index = build_caption_index({}, {"part/metadata.jsonl": b'{"file_name": "a.png", "text": "first"}\n'})
    caption = index.lookup("part/a.png")
    assert caption.text == "first" and caption.origin == "metadata.jsonl"


def test_a_sidecar_wins_over_a_metadata_row() -> None:
    index = build_caption_index({"a.txt": b"sidecar"}, {"captions.csv": b"file_name,caption\na.png,row\n"})
    assert index.lookup("a.png").text == "sidecar"


def test_bad_jsonl_lines_are_reported_with_their_line_number() -> None:
    rows, problems = parse_metadata_jsonl('{"file_name": "a.png", "text": "ok"}\nnot json\n{"text": "x"}\n')
    assert rows == {"a.png": "ok"}
    assert [p.name for p in problems] == ["metadata.jsonl:2", "metadata.jsonl:3"]


def test_a_csv_without_a_caption_column_is_reported() -> None:
    rows, problems = parse_captions_csv("file_name,tags\na.png,x\n")
    assert rows == {} and "caption column" in problems[0].reason


def test_a_csv_with_caption_column_gives_one_caption_per_row() -> None:
    rows, problems = parse_captions_csv('file,caption\na.png,"one, two"\nb.png, three \n')
    assert rows == {"a.png": "one, two", "b.png": "three"} and problems == []


def test_an_unreadable_sidecar_becomes_a_caption_error_for_its_image() -> None:
    index = build_caption_index({"a.txt": "é".encode("latin-1")}, {}, allow_legacy_encodings=False)
    assert isinstance(index.lookup("a.png"), CaptionError)
