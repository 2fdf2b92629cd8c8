"""A bad training config refuses the launch: no run is created and no step waits for a GPU
slot before failing. Through the webserver's GraphQL (the launchpad's path, against a real
code server process) and through ``materialize`` (the API's path).

Two layers: ``params`` is a typed config derived from TrainingParams, so Dagster itself refuses
a wrong type, an unknown name or a value outside an enumeration (and the launchpad's editor marks
it as it is typed); a value out of range (``rank: 0``) is refused by trained_lora's config mapping
when the run is created.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import instance_for_test
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, infer_job_selector

import lora_pipeline.definitions as definitions
from lora_pipeline.defs.assets.trained_lora import checked_training_config, trained_lora
from lora_pipeline.defs.config import TrainingConfig
from lora_pipeline.defs.partitions import styles_partitions

LAUNCH = """
mutation($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on LaunchRunSuccess { run { runId } }
  }
}"""
LIVE_CHECK = """
query($selector: PipelineSelector!, $runConfigData: RunConfigData) {
  isPipelineConfigValid(pipeline: $selector, runConfigData: $runConfigData, mode: "default") {
    __typename
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

TYPED = [  # refused by Dagster's config types: live in the editor, and at launch
    ({"learning_rate": "fast"}, 'Value "fast" of type "<class \'str\'>" is not valid for expected type "Float"'),
    ({"bogus": 1}, 'Received unexpected config entry "bogus" at path root:ops:trained_lora:config:params'),
    ({"lr_scheduler": "sometimes"}, "not in enum type lr_scheduler got sometimes"),
]
RANGED = [  # refused by TrainingParams' own checks, in the config mapping, at launch
    ({"rank": 0}, "trained_lora config, params: rank: Input should be greater than or equal to 1 (got 0)"),
    ({"rank": 512}, "trained_lora config, params: rank: Input should be less than or equal to 256 (got 512)"),
]


def _config(params: dict) -> dict:
    return {"ops": {"trained_lora": {"config": {"params": params}}}}


def _launch(context, selector, params: dict) -> dict:
    variables = {
        "executionParams": {
            "selector": selector,
            "mode": "default",
            "runConfigData": _config(params),
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "sample_style"}]},
        }
    }
    return execute_dagster_graphql(context, LAUNCH, variables=variables).data["launchPipelineExecution"]


def _live_check(context, selector, params: dict) -> dict:
    variables = {"selector": selector, "runConfigData": _config(params)}
    return execute_dagster_graphql(context, LIVE_CHECK, variables=variables).data["isPipelineConfigValid"]


def test_the_launchpad_refuses_bad_params_naming_them_and_creates_no_run(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(styles_partitions.name, ["sample_style"])
        with define_out_of_process_context(definitions.__file__, "defs", instance) as context:
            selector = infer_job_selector(context, "__ASSET_JOB", asset_selection=[{"path": ["trained_lora"]}])
            for params, message in TYPED:
                live = _live_check(context, selector, params)
                assert live["__typename"] == "RunConfigValidationInvalid", live
                assert any(message in e["message"] for e in live["errors"]), live
                answer = _launch(context, selector, params)
                assert answer["__typename"] == "RunConfigValidationInvalid", answer
                assert any(message in e["message"] for e in answer["errors"]), answer
            for params, message in RANGED:
                answer = _launch(context, selector, params)
                assert answer["__typename"] == "PythonError", answer
                assert message in answer["message"] and "Value error" not in answer["message"]
            assert _live_check(context, selector, {"rank": 8, "lr_scheduler": "cosine"})["__typename"] == (
                "PipelineConfigValidationValid"
            )
        assert instance.get_runs() == []


@pytest.mark.parametrize(("params", "message"), TYPED + RANGED)
def test_materialize_refuses_a_bad_param_before_any_step(params, message, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(styles_partitions.name, ["sample_style"])
    resources = definitions.defs.resources
    with pytest.raises(dg.DagsterInvalidConfigError) as raised:
        dg.materialize(
            [trained_lora],
            partition_key="sample_style",
            instance=instance,
            run_config=_config(params),
            resources=resources,
        )
    assert message.split(" (got")[0] in str(raised.value)
    assert instance.get_runs() == []


def test_params_are_the_training_params_fields_and_only_the_set_ones_override():
    from lora_pipeline.contracts.training import TrainingParams

    config = TrainingConfig.model_validate({"params": {"rank": 8, "lr_scheduler": "cosine", "alpha": None}})
    assert config.params.overrides() == {"rank": 8, "lr_scheduler": "cosine"}
    assert TrainingConfig().params.overrides() == {}
    assert set(type(config.params).model_fields) == set(TrainingParams.model_fields)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_a_flag_that_also_takes_auto_accepts_both_and_training_params_checks_it(value):
    """``gradient_checkpointing: bool | "auto"`` has no Dagster config type: any value passes the
    config, the boolean as before, and the config mapping's TrainingParams check refuses the rest."""
    from lora_pipeline.contracts.training import TrainingParams

    config = TrainingConfig.model_validate({"params": {"gradient_checkpointing": value, "quantize_base": "auto"}})
    assert TrainingParams(**config.params.overrides()).gradient_checkpointing == value
    assert checked_training_config({"params": {"gradient_checkpointing": value}})
    with pytest.raises(Exception, match="gradient_checkpointing"):
        checked_training_config({"params": {"gradient_checkpointing": "sometimes"}})


def test_a_good_config_and_a_completion_handover_pass_unchanged():
    good = {"params": {"rank": 8, "max_train_steps": 100, "alpha": None}, "base_model": "tiny"}
    assert checked_training_config(good) == good
    handover = {"status_body": '{"id": "j", "status": "COMPLETED"}', "params": {"rank": 0}}
    assert checked_training_config(handover) == handover  # a finished job is recorded, never trained


@pytest.mark.parametrize(("params", "message"), TYPED)
def test_the_train_lora_job_refuses_a_mistyped_param_before_any_step(params, message):
    job = definitions.defs.resolve_job_def("train_lora")
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(dg.DagsterInvalidConfigError) as raised:
        job.execute_in_process(
            instance=instance, run_config={"ops": {"submit_lora_training": {"config": {"params": params}}}}
        )
    assert message.replace("trained_lora", "submit_lora_training") in str(raised.value)
    assert instance.get_runs() == []


MISMATCH = "model_family 'flux1' does not match base_model 'tiny-sdxl', a 'sdxl' model"


def test_a_family_base_mismatch_refuses_the_launch_in_one_line(tmp_path: Path, monkeypatch):
    config = {"base_model": "tiny-sdxl", "model_family": "flux1"}
    with pytest.raises(dg.DagsterInvalidConfigError, match=f"trained_lora config: {MISMATCH}"):
        checked_training_config(config)
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(styles_partitions.name, ["sample_style"])
    with pytest.raises(dg.DagsterInvalidConfigError, match=MISMATCH):
        dg.materialize(
            [trained_lora],
            partition_key="sample_style",
            instance=instance,
            run_config={"ops": {"trained_lora": {"config": config}}},
            resources=definitions.defs.resources,
        )
    assert instance.get_runs() == []
    assert checked_training_config({"base_model": "tiny-sdxl", "model_family": "sdxl"})


def test_the_demo_refuses_a_mismatch_before_anything_runs(tmp_path: Path, monkeypatch):
    from click.testing import CliRunner

    from lora_pipeline.cli import main

    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    result = CliRunner().invoke(main, ["demo", "--base-model", "tiny-sdxl", "--model-family", "flux1"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: demo step 'launch check' failed: {MISMATCH}"
    assert not (tmp_path / "store").exists()
