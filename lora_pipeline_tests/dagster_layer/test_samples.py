"""The worker's sample images on the ``trained_lora`` materialization: an inline grid (thumbnails
as data URIs for a local store) and a table of prompt, seed and key."""

from __future__ import annotations

import io

import dagster as dg
from PIL import Image

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.resources import TrainingBackendResource
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.dagster_layer.conftest import StubBackend
from lora_pipeline_tests.dagster_layer.test_one_materialization import ASSETS, FAST, LORA_KEY, STYLE
from lora_pipeline_tests.registry.lora_files import lora_bytes


def png(color: tuple[int, int, int], size: int = 256) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


SAMPLES = [
    {"key": f"loras/{STYLE}/{STYLE}_v1_sample_0.png", "prompt": "geo, a red square", "seed": 7},
    {"key": f"loras/{STYLE}/{STYLE}_v1_sample_1.png", "prompt": "geo, a blue | square", "seed": 8},
]


class SamplingBackend(StubBackend):
    """A job done at its first poll, whose worker stored a LoRA and two sample images."""

    def __init__(self, store) -> None:
        super().__init__()
        self.store = store

    def status(self, job_id: str) -> JobStatus:
        if job_id in self.answers and self.answers[job_id].status == "IN_QUEUE":
            self.store.put(LORA_KEY, lora_bytes({"lora_pipeline.steps": "30"}))
            for sample, color in zip(SAMPLES, [(255, 0, 0), (0, 0, 255)], strict=True):
                self.store.put(sample["key"], png(color), content_type="image/png")
            output = {"lora_key": LORA_KEY, "samples": SAMPLES, "sample_keys": [s["key"] for s in SAMPLES]}
            self.answers[job_id] = JobStatus(id=job_id, status="COMPLETED", output=output)
        return super().status(job_id)


def test_the_trained_lora_materialization_shows_every_sample_inline_with_its_prompt_and_seed(
    store, instance, monkeypatch
) -> None:
    from lora_pipeline.definitions import defs

    stub = SamplingBackend(store)
    monkeypatch.setattr(TrainingBackendResource, "get_backend", lambda self, store: stub)
    instance.add_dynamic_partitions("styles", [STYLE])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(a) for a in ASSETS})
    assert job.execute_in_process(instance=instance, partition_key=STYLE, run_config=FAST).success

    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_lora"), asset_partitions=[STYLE]), limit=10
    ).records
    metadata = record.asset_materialization.metadata
    markdown = metadata["samples"].value
    assert markdown.count("](data:image/png;base64,") == 2  # a local store: embedded thumbnails
    assert metadata["sample_count"].value == 2
    rows = [r.data for r in metadata["sample_prompts"].records]
    assert rows == [
        {"#": 0, "prompt": "geo, a red square", "seed": 7, "key": "loras/sample_style/sample_style_v1_sample_0.png"},
        {"#": 1, "prompt": "geo, a blue | square", "seed": 8, "key": "loras/sample_style/sample_style_v1_sample_1.png"},
    ]

    document, _ = RegistryStore(store).read(STYLE)
    [entry_0, entry_1] = document.to_dict()["versions"][0]["samples"]
    assert (entry_0["key"], entry_0["prompt"], entry_0["seed"]) == (SAMPLES[0]["key"], "geo, a red square", 7)
    assert entry_1["url"] == store.url(SAMPLES[1]["key"])


def test_thumbnails_are_small_and_a_public_store_is_linked_not_embedded(store) -> None:
    import base64

    from lora_pipeline.lifecycle.samples import image_sources, thumbnail_data_uri
    from lora_pipeline.registry.models import SampleImage

    uri = thumbnail_data_uri(png((0, 255, 0), size=512))
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.size == (128, 128)
    tiny = thumbnail_data_uri(png((0, 0, 255), size=32))  # the tiny model's samples: scaled up to be seen
    with Image.open(io.BytesIO(base64.b64decode(tiny.split(",", 1)[1]))) as image:
        assert image.size == (128, 128) and image.convert("RGB").getpixel((127, 127)) == (0, 0, 255)

    store.put("loras/a/a_v1_sample_0.png", png((1, 2, 3)))
    sample = SampleImage("loras/a/a_v1_sample_0.png", "p", 1, "https://cdn.example.com/loras/a/a_v1_sample_0.png")
    assert image_sources(store, [sample])[0].startswith("data:image/png;base64,")  # no public base: embedded
    assert image_sources(store, [SampleImage("loras/a/missing.png")]) == [None]  # a gap, not a failure
    assert image_sources(store, [sample], budget=10) == [None]  # over the budget
    store.public_base_url = "https://cdn.example.com"
    assert image_sources(store, [sample]) == ["https://cdn.example.com/loras/a/a_v1_sample_0.png"]


def test_a_linked_grid_of_eight_fits_dagsters_inline_markdown_limit(store) -> None:
    """Dagster's UI shows Markdown inline only under 1,000 characters: a grid of linked samples
    (a store with a public base URL) must fit, so the Events tab shows it without a click."""
    from lora_pipeline.lifecycle.samples import samples_markdown
    from lora_pipeline.registry.models import SampleImage

    store.public_base_url = "https://cdn.example.com"
    samples = [
        SampleImage(f"loras/style_59/style_59_v12_sample_{i}.png", "a long prompt " * 8, i, None) for i in range(8)
    ]
    grid = samples_markdown(store, samples)
    assert grid.count("](https://cdn.example.com/loras/style_59/style_59_v12_sample_") == 8
    assert len(grid) < 1000, len(grid)
