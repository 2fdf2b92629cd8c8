"""A LoRA file counts only if its safetensors header parses, read with ranged GETs."""

import json
import struct

import pytest

from lora_pipeline.registry.safetensors_header import InvalidLoraFile, parse_header
from lora_pipeline.registry_store.lora_files import read_header

from .lora_files import lora_bytes, truncated_lora_bytes


def test_parse_header_returns_tensors_and_metadata():
    header = parse_header(lora_bytes({"ss_network_dim": "4"}))
    assert header["__metadata__"]["ss_network_dim"] == "4"
    assert "unet.block.0.lora_A.weight" in header


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"abc", "shorter than the 8-byte"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 20) + b"not json at all....", "truncated"),
        (struct.pack("<Q", 8) + b"[1,2,3] ", "JSON object"),
        (struct.pack("<Q", 8) + b'{"a":1} ', "not an object"),
        (struct.pack("<Q", 2) + b"{}", "no tensors"),
    ],
)
def test_parse_header_refuses_what_is_not_a_safetensors_header(data, message):
    with pytest.raises(InvalidLoraFile, match=message):
        parse_header(data)


def test_parse_header_refuses_offsets_that_do_not_match_the_shape():
    header = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidLoraFile, match="dtype × shape"):
        parse_header(struct.pack("<Q", len(raw)) + raw)


def test_read_header_reads_a_valid_file_from_either_store(store):
    store.put("loras/s/s_v1.safetensors", lora_bytes({"lora_pipeline.job_id": "j"}))
    header = read_header(store, "loras/s/s_v1.safetensors")
    assert header.metadata["lora_pipeline.job_id"] == "j"
    assert header.file_size == len(lora_bytes({"lora_pipeline.job_id": "j"}))


def test_read_header_refuses_a_truncated_upload_naming_the_key(store):
    store.put("loras/s/s_v1.safetensors", truncated_lora_bytes())
    with pytest.raises(InvalidLoraFile, match=r"loras/s/s_v1.safetensors.*truncated"):
        read_header(store, "loras/s/s_v1.safetensors")


def test_read_header_refuses_a_missing_file(local_store):
    with pytest.raises(InvalidLoraFile, match="no such file"):
        read_header(local_store, "loras/s/s_v9.safetensors")


def test_read_header_reads_a_large_header_with_a_second_ranged_read(local_store):
    data = lora_bytes({"big": "x" * 100_000})
    local_store.put("loras/s/s_v1.safetensors", data)
    assert read_header(local_store, "loras/s/s_v1.safetensors").metadata["big"] == "x" * 100_000


class _CountingStore:
    """Wraps a store and records every ranged read, to prove the whole file is never read."""

    def __init__(self, inner):
        self.inner, self.ranges = inner, []

    def get_range(self, key, start, length):
        self.ranges.append((start, length))
        return self.inner.get_range(key, start, length)

    def get(self, key):
        raise AssertionError("read_header must not GET the whole object")

    def head(self, key):
        return self.inner.head(key)


def test_read_header_uses_ranged_reads_only(local_store):
    local_store.put("loras/s/s_v1.safetensors", lora_bytes() + b"")
    counting = _CountingStore(local_store)
    read_header(counting, "loras/s/s_v1.safetensors")
    assert counting.ranges == [(0, 64 * 1024)]


def test_is_readable_lora_answers_for_the_asset_check(local_store):
    from lora_pipeline.registry_store.lora_files import is_readable_lora

    local_store.put("loras/s/s_v1.safetensors", lora_bytes())
    local_store.put("loras/s/s_v2.safetensors", truncated_lora_bytes())
    assert is_readable_lora(local_store, "loras/s/s_v1.safetensors")
    assert not is_readable_lora(local_store, "loras/s/s_v2.safetensors")
    assert not is_readable_lora(local_store, "loras/s/s_v3.safetensors")
