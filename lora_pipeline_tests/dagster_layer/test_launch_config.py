"""A bad training config refuses the launch: no run is created and no step waits for a GPU
slot before failing. Through the webserver's GraphQL (the launchpad's path, against a real
code server process) and through ``materialize`` (the API's path)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import instance_for_test
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, infer_job_selector

import lora_pipeline.definitions as definitions
from lora_pipeline.defs.assets.trained_lora import checked_training_config, trained_lora
from lora_pipeline.defs.partitions import styles_partitions

LAUNCH = """
mutation($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on PythonError { message }
    ... on LaunchRunSuccess { run { runId } }
  }
}"""

BAD = [
    ({"rank": 0}, "params: rank: Input should be greater than or equal to 1 (got 0)"),
    ({"learning_rate": "fast"}, "params: learning_rate: Input should be a valid number"),
    ({"bogus": 1}, "params: bogus: Extra inputs are not permitted (got 1)"),
]


def _config(params: dict) -> dict:
    return {"ops": {"trained_lora": {"config": {"params": params}}}}


def test_the_launchpad_refuses_a_bad_param_naming_it_and_creates_no_run(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(styles_partitions.name, ["sample_style"])
        with define_out_of_process_context(definitions.__file__, "defs", instance) as context:
            selector = infer_job_selector(context, "__ASSET_JOB", asset_selection=[{"path": ["trained_lora"]}])
            for params, message in BAD:
                answer = execute_dagster_graphql(
                    context,
                    LAUNCH,
                    variables={
                        "executionParams": {
                            "selector": selector,
                            "mode": "default",
                            "runConfigData": _config(params),
                            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "sample_style"}]},
                        }
                    },
                ).data["launchPipelineExecution"]
                assert answer["__typename"] == "PythonError", answer
                assert f"trained_lora config, {message}" in answer["message"]
                assert "Value error" not in answer["message"]
        assert instance.get_runs() == []


@pytest.mark.parametrize(("params", "message"), BAD)
def test_materialize_refuses_a_bad_param_before_any_step(params, message, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(styles_partitions.name, ["sample_style"])
    resources = definitions.defs.resources
    with pytest.raises(dg.DagsterInvalidConfigError, match="trained_lora config, " + message.split(" (")[0]):
        dg.materialize(
            [trained_lora],
            partition_key="sample_style",
            instance=instance,
            run_config=_config(params),
            resources={"storage": resources["storage"], "training_backend": resources["training_backend"]},
        )
    assert instance.get_runs() == []


def test_a_good_config_and_a_completion_handover_pass_unchanged():
    good = {"params": {"rank": 8, "max_train_steps": 100}, "base_model": "tiny"}
    assert checked_training_config(good) == good
    handover = {"status_body": '{"id": "j", "status": "COMPLETED"}', "params": {"rank": 0}}
    assert checked_training_config(handover) == handover  # a finished job is recorded, never trained
