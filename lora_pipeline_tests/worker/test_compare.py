"""``registry compare``: two real tiny-model versions rendered on the same prompts and seed,
side by side in one image in the store; refusals name what is wrong."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from lora_pipeline.cli import main
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.lifecycle.submit import record_completion
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.keys import comparison_key
from lora_pipeline.worker.compare import LABEL_WIDTH, HEADER_HEIGHT, MIN_CELL, compose_grid
from lora_pipeline.worker.handler import handler
from lora_pipeline_tests.worker.conftest import STYLE, png_bytes, request_dict

pytestmark = pytest.mark.slow  # trains two tiny LoRAs


def train_version(store, digest: str, number: int, learning_rate: float) -> None:
    """Train version ``number`` with the handler and record it as a completion sensor would."""
    from datetime import UTC, datetime

    job_id = f"5f0e8a52-000{number}-4c1e-9b0a-9e0c3f1a000{number}-e1"
    request = request_dict(
        store, digest, version=f"V{number}", request_id=f"req-{number}", params={"learning_rate": learning_rate}
    )
    RegistryStore(store).apply(
        STYLE, [Submission(STYLE, number, f"req-{number}", job_id, digest, request["params"], datetime.now(UTC))]
    )
    output = handler({"id": job_id, "input": request})
    assert "error" not in output, output
    record_completion(store, STYLE, JobStatus(id=job_id, status="COMPLETED", output=output), source="poll")


def compare(store, monkeypatch, *args: str):
    monkeypatch.setenv("LORA_STORAGE_URL", str(store.root))
    return CliRunner().invoke(main, ["registry", "compare", STYLE, *args])


def test_compare_renders_both_versions_side_by_side_and_refuses_what_it_cannot(
    store, sample_dataset, monkeypatch
) -> None:
    train_version(store, sample_dataset, 1, 1e-3)
    train_version(store, sample_dataset, 2, 5e-1)  # far apart: the images must differ

    result = compare(
        store, monkeypatch, "V1", "V2", "--prompt", "geo, a", "--prompt", "geo, b", "--steps", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower()  # the libraries are quiet
    out = json.loads(result.stdout)
    assert {row["what"] for row in out["sideBySide"]} >= {"dataset", "steps", "final loss", "learning_rate"}
    assert out["key"] == comparison_key(STYLE, "V1", "V2") == "comparisons/geo/V1_vs_V2.png"
    assert out["prompts"] == ["geo, a", "geo, b"] and out["baseModel"] == "tiny"
    grid = Image.open(io.BytesIO(store.get(out["key"]).data)).convert("RGB")
    assert grid.size == tuple(out["size"]) == (LABEL_WIDTH + 2 * MIN_CELL, HEADER_HEIGHT + 2 * MIN_CELL)
    left = grid.crop((LABEL_WIDTH, HEADER_HEIGHT, LABEL_WIDTH + MIN_CELL, HEADER_HEIGHT + MIN_CELL))
    right = grid.crop((LABEL_WIDTH + MIN_CELL, HEADER_HEIGHT, LABEL_WIDTH + 2 * MIN_CELL, HEADER_HEIGHT + MIN_CELL))
    assert left.tobytes() != right.tobytes()

    observed = run_compare_job(store, ["V1", "V2"], steps=1)
    assert observed["comparison"].value.startswith("![V1 vs V2](data:image/png;base64,")
    assert observed["key"].value == out["key"]

    unknown = compare(store, monkeypatch, "V1", "V9")
    assert unknown.exit_code != 0 and "geo has no version V9 (it has: V1, V2)" in unknown.output

    for key in [k.key for k in store.list(f"loras/{STYLE}/{STYLE}_v2")]:
        if key.endswith(".safetensors") and "kohya" not in key:
            store.delete(key)
    doc, _ = RegistryStore(store).read(STYLE)
    from dataclasses import replace

    from lora_pipeline.registry.models import RegistryDocument

    # A version recorded without its diffusers-layout file (a legacy kohya-only version).
    v2 = doc.version(2)
    legacy = replace(v2, file=None, lora_url=None)
    store.put(
        f"registry/{STYLE}/training_versions.json",
        RegistryDocument(style=STYLE, versions=(doc.version(1), legacy)).to_json(),
    )
    missing = compare(store, monkeypatch, "V1", "V2")
    assert missing.exit_code != 0 and "V2 has no diffusers-layout LoRA file" in missing.output


def run_compare_job(store, versions: list[str], **config) -> dict:
    """Run ``compare_lora_versions`` on ``store``; the metadata of its observation of trained_lora."""
    import dagster as dg

    from lora_pipeline.definitions import defs
    from lora_pipeline.defs.resources import StorageResource

    job = defs.resolve_job_def("compare_lora_versions")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            resources={"storage": StorageResource(storage_url=str(store.root))},
            run_config={
                "ops": {"render_lora_comparison": {"config": {"style": STYLE, "versions": versions, **config}}}
            },
            raise_on_error=False,
        )
        if not result.success:
            failure = [e for e in result.all_events if e.is_step_failure][0]
            return {"failure": failure.step_failure_data.user_failure_data.description}
        [observation] = [
            e.asset_observation_data.asset_observation for e in result.all_events if e.is_asset_observation
        ]
        return observation.metadata


def test_the_compare_job_refuses_an_unknown_version_with_its_reason(store) -> None:
    observed = run_compare_job(store, ["V1", "V2"])
    assert "comparison refused: geo has no version V1 (it has: none)" in observed["failure"]


def test_the_grid_labels_each_version_and_prompt() -> None:
    png, size = compose_grid(["p1"], ["V1", "V2"], [[png_bytes((255, 0, 0))], [png_bytes((0, 0, 255))]])
    grid = Image.open(io.BytesIO(png)).convert("RGB")
    assert grid.size == size == (LABEL_WIDTH + 2 * MIN_CELL, HEADER_HEIGHT + MIN_CELL)
    assert grid.getpixel((LABEL_WIDTH + 5, HEADER_HEIGHT + 5)) == (255, 0, 0)
    assert grid.getpixel((LABEL_WIDTH + MIN_CELL + 5, HEADER_HEIGHT + 5)) == (0, 0, 255)
