"""LoraTraining: styles declared in defs.yaml files are partitions of the same assets, with
their declared settings as the defaults of their runs (lora_pipeline/defs/lora_training.py)."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.lifecycle.submit import training_params

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.declared_styles import DECLARED_STYLES
from lora_pipeline.defs.discovery_sensors import new_dataset_version_sensor, style_discovery_sensor
from lora_pipeline.defs.pipeline import DuplicateStyleDeclaration, pipeline_with_declared_styles
from lora_pipeline.defs.pipeline import PIPELINE
from lora_pipeline.defs.resources import TrainingBackendResource
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.dagster_layer.conftest import StubBackend, dg_project
from lora_pipeline_tests.dataset.builders import good_images, write_files
from lora_pipeline_tests.registry.lora_files import lora_bytes

ASSETS = ("training_dataset", "trained_lora", "lora_registry")


def declare(source: Path | None = None, **attributes: str) -> str:
    """A LoraTraining defs.yaml with ``attributes`` (YAML fragments) as given."""
    body = "".join(f"  {name}: {value}\n" for name, value in attributes.items())
    if source is not None:
        body += f"  source: {source}\n"
    return f"type: lora_pipeline.LoraTraining\nattributes:\n{body}"


WATERCOLOR = dict(
    style="watercolor",
    trigger_word="wtrclr",
    base_model="tiny-sdxl",
    params="{rank: 8, max_train_steps: 40}",
    automation="on_new_dataset_version",
    schedule="'0 3 * * *'",
)
INK = dict(style="ink", trigger_word="inkdrw")


def make_project(root: Path, declarations: dict[str, str]) -> Path:
    """``dg_project`` on the import path (the loader imports its defs module)."""
    dg_project(root, declarations)
    sys.path.insert(0, str(root))
    return root


@pytest.fixture
def project(tmp_path: Path, store_dir: Path):
    """Two declared styles: watercolor (its own source, automated, scheduled) and ink (manual)."""
    sources = {name: write_files(tmp_path / "sources" / name, good_images(5)) for name in ("watercolor", "ink")}
    root = make_project(
        tmp_path / "project",
        {"watercolor": declare(sources["watercolor"], **WATERCOLOR), "ink": declare(sources["ink"], **INK)},
    )
    yield root
    sys.path.remove(str(root))


def load(project_root: Path) -> dg.Definitions:
    """The project's code location, loaded as lora_pipeline.definitions loads its own: the
    pipeline with the styles declared in the project's defs folder ([tool.dg.project] defs_module)."""
    defs_module = tomllib.loads((project_root / "pyproject.toml").read_text())["tool"]["dg"]["project"]["defs_module"]
    return pipeline_with_declared_styles(importlib.import_module(defs_module), project_root)


class CompletingBackend(StubBackend):
    """A job that is done at its first status poll, with its LoRA file in the store."""

    def __init__(self, store) -> None:
        super().__init__()
        self.store = store

    def status(self, job_id: str) -> JobStatus:
        if self.answers.get(job_id) is not None and self.answers[job_id].status == "IN_QUEUE":
            request = next(r for i, r in enumerate(self.submitted) if job_id.startswith(f"0000000{i}-"))
            key = f"loras/{request.style}/{request.style}_v1.safetensors"
            self.store.put(key, lora_bytes({"lora_pipeline.steps": "40"}))
            self.answers[job_id] = JobStatus(id=job_id, status="COMPLETED", output={"lora_key": key})
        return super().status(job_id)


def test_declared_styles_are_partitions_of_the_pipelines_own_assets(project):
    """Two declarations give the pipeline's assets, checks and jobs (the very objects), the two
    declarations, and only what their automation asks for: watercolor's schedule and training sensor."""
    defs = load(project)
    for kind in ("assets", "asset_checks", "jobs"):
        assert [id(d) for d in getattr(defs, kind)] == [id(d) for d in getattr(PIPELINE, kind)], kind
    repo = defs.get_repository_def()
    pipeline = PIPELINE.get_repository_def()
    assert {j.name for j in repo.get_all_jobs()} == {j.name for j in pipeline.get_all_jobs()}
    assert set(repo.asset_checks_defs_by_key) == set(pipeline.asset_checks_defs_by_key)
    assert {s.name for s in repo.sensor_defs} == {s.name for s in pipeline.sensor_defs} | {"watercolor_training_sensor"}
    assert {s.name for s in repo.schedule_defs} == {s.name for s in pipeline.schedule_defs} | {
        "watercolor_dataset_schedule"
    }
    declared = defs.resources[DECLARED_STYLES]
    assert sorted(declared) == ["ink", "watercolor"]
    assert declared["watercolor"].params == {"rank": 8, "max_train_steps": 40}
    assert declared["watercolor"].train_on_new_dataset and not declared["ink"].train_on_new_dataset
    assert declared["ink"].base_model is None and declared["ink"].schedule is None


def test_a_declared_style_materializes_with_its_declared_settings(project, store, instance, monkeypatch):
    """The README's three assets for watercolor: its declared source and trigger word are ingested,
    its base model and params preset are what the training job gets, and V1 is recorded; ink,
    declared beside it, is untouched."""
    backend = CompletingBackend(store)
    monkeypatch.setattr(TrainingBackendResource, "get_backend", lambda self, store: backend)
    defs = load(project)
    instance.add_dynamic_partitions("styles", ["watercolor", "ink"])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(a) for a in ASSETS})
    result = job.execute_in_process(
        instance=instance,
        partition_key="watercolor",
        run_config={"ops": {"trained_lora": {"config": {"poll_interval_s": 0.01}}}},
    )
    assert result.success
    [request] = backend.submitted
    assert (request.style, request.base_model) == ("watercolor", "tiny-sdxl")
    assert (request.params.rank, request.params.max_train_steps) == (8, 40)
    # The declared base model's preset (tiny-sdxl is built in code: the tiny models' preset), then the declaration's.
    assert request.params.resolution == training_params("tiny-sdxl", {}).resolution
    dataset = result.asset_materializations_for_node("training_dataset")[0]
    assert dataset.metadata["source"].value == str(project.parent / "sources" / "watercolor")
    [version] = RegistryStore(store).read("watercolor")[0].versions
    assert (version.name, version.status.value) == ("V1", "completed")
    assert RegistryStore(store).read("ink")[1] is None  # no document: nothing ran for ink


def test_a_runs_own_config_still_wins_over_the_declaration(project, store, instance, backend):
    """Launch config beats the declared defaults field by field (train_lora, the hand job): base
    model and rank from the run, max_train_steps from the preset, resolution from the run's base
    model's preset."""
    defs = load(project)
    instance.add_dynamic_partitions("styles", ["watercolor"])
    assert (
        defs.resolve_job_def("ingest_training_dataset")
        .execute_in_process(instance=instance, partition_key="watercolor")
        .success
    )
    config = {"base_model": "tiny", "params": {"rank": 2}, "wait_for_completion": False}
    assert (
        defs.resolve_job_def("train_lora")
        .execute_in_process(
            instance=instance,
            partition_key="watercolor",
            run_config={"ops": {"submit_lora_training": {"config": config}}},
        )
        .success
    )
    [request] = backend.submitted
    assert (request.base_model, request.params.rank, request.params.max_train_steps) == ("tiny", 2, 40)
    assert request.params.resolution == 32


def test_sensors_and_schedule_follow_the_declarations(project, store, instance):
    """Discovery adds both declared styles; a new dataset version of watercolor (automated) trains
    through the declared sensor, ink's (manual) does not, and the hand switch skips both while
    still training a style added by hand."""
    defs = load(project)
    repo = defs.get_repository_def()
    resources = {key: defs.resources[key] for key in ("storage", DECLARED_STYLES)}
    with dg.build_sensor_context(instance=instance, repository_def=repo, resources=resources) as context:
        discovered = style_discovery_sensor(context)
    [added] = discovered.dynamic_partitions_requests
    assert {"watercolor", "ink", "sample_style"} <= set(added.partition_keys)
    instance.add_dynamic_partitions("styles", list(added.partition_keys))
    ingest = defs.resolve_job_def("ingest_training_dataset")
    for style in ("watercolor", "ink", "sample_style"):
        assert ingest.execute_in_process(instance=instance, partition_key=style).success

    def partitions(sensor) -> list[str]:
        with dg.build_sensor_context(instance=instance, repository_def=repo, resources=resources) as context:
            return sorted(r.partition_key for r in sensor(context).run_requests)

    assert partitions(repo.get_sensor_def("watercolor_training_sensor")) == ["watercolor"]
    assert partitions(new_dataset_version_sensor) == ["sample_style"]
    schedule = repo.get_schedule_def("watercolor_dataset_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.build_schedule_context(instance=instance, repository_def=repo) as context:
        [request] = schedule.evaluate_tick(context).run_requests
    assert (request.partition_key, schedule.job_name) == ("watercolor", "ingest_training_dataset")


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [
        ({**INK, "params": "{rank: 0}"}, "rank"),
        ({**INK, "params": "{ranks: 4}"}, "ranks"),
        ({**INK, "style": "'../etc'"}, "style"),
        ({**INK, "automation": "always"}, "automation"),
        ({**INK, "schedule": "'every night'"}, "schedule"),
        ({**INK, "colour": "red"}, "colour"),
        ({**INK, "base_model": "tiny", "params": "{resolution: 4}"}, "resolution"),
    ],
)
def test_a_bad_declaration_fails_loading_naming_the_field_and_line(tmp_path: Path, attributes, problem):
    """The code location does not load: Dagster's error names the defs.yaml, its line and the field."""
    root = make_project(tmp_path / "project", {"ink": declare(**attributes)})
    try:
        with pytest.raises(Exception) as raised:
            load(root)
    finally:
        sys.path.remove(str(root))
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert "defs.yaml (LoraTraining) (error)" in chain[0]
    causes = "\n".join(chain[1:])
    assert problem in causes
    assert re.search(r"ink/defs\.yaml:\d+", causes)


def test_a_style_name_with_two_dots_fails_loading_naming_it(tmp_path: Path):
    root = make_project(tmp_path / "project", {"ink": declare(**{**INK, "style": "ink..v2"})})
    try:
        with pytest.raises(Exception) as raised:
            load(root)
    finally:
        sys.path.remove(str(root))
    assert "invalid style name 'ink..v2'" in str(raised.value.__cause__)


def test_two_declarations_of_one_style_fail_loading(tmp_path: Path):
    root = make_project(tmp_path / "project", {"ink": declare(**INK), "ink_again": declare(**INK)})
    try:
        module = importlib.import_module(next(p.name for p in root.iterdir() if p.name.startswith("team_")) + ".defs")
        with pytest.raises(DuplicateStyleDeclaration, match="style ink is declared by more than one defs.yaml"):
            pipeline_with_declared_styles(module, root)
    finally:
        sys.path.remove(str(root))


def test_the_code_location_with_no_declared_style_is_the_pipeline():
    """The shipped project declares no style: the code location is PIPELINE's objects alone."""
    from lora_pipeline.definitions import defs

    repo = defs.get_repository_def()
    assert dict(defs.resources[DECLARED_STYLES]) == {}
    assert {s.name for s in repo.sensor_defs} == {s.name for s in PIPELINE.get_repository_def().sensor_defs}
