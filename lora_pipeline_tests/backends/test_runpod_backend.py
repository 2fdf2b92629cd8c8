"""The backend-neutral contract: status bodies and execution policies."""

from __future__ import annotations

import pytest

from lora_pipeline.backends.base import ExecutionPolicy
from lora_pipeline.contracts.job_status import JobStatus


def test_policy_from_training_outlasts_runpods_ten_minute_default_for_long_training():
    policy = ExecutionPolicy.from_training(4000)
    assert policy.execution_timeout_ms > 600_000
    assert policy.ttl_ms > policy.execution_timeout_ms


def test_policy_grows_with_planned_steps():
    assert (
        ExecutionPolicy.from_training(5000).execution_timeout_ms
        > ExecutionPolicy.from_training(500).execution_timeout_ms
    )


def test_policy_is_clamped_to_runpods_seven_day_limit():
    policy = ExecutionPolicy.from_training(1_000_000, seconds_per_step=10)
    assert policy.execution_timeout_ms == policy.ttl_ms == 7 * 24 * 3600 * 1000


def test_policy_serialises_to_runpods_field_names():
    assert ExecutionPolicy(60_000, 120_000).to_api() == {"executionTimeout": 60_000, "ttl": 120_000}


def test_policy_refuses_a_ttl_shorter_than_the_execution_timeout():
    with pytest.raises(ValueError, match="ttl_ms"):
        ExecutionPolicy(execution_timeout_ms=60_000, ttl_ms=10_000)


def test_policy_refuses_zero_steps():
    with pytest.raises(ValueError, match="max_train_steps"):
        ExecutionPolicy.from_training(0)


def test_status_body_keeps_unknown_keys_for_round_trips():
    body = {"id": "j-u1", "status": "COMPLETED", "output": {"a": 1}, "workerId": "w1"}
    assert JobStatus.model_validate(body).to_body() == body


def test_completed_with_an_error_dict_is_not_a_success():
    status = JobStatus.model_validate({"id": "j", "status": "COMPLETED", "output": {"error": "oom"}})
    assert not status.succeeded
    assert status.failure_message() == "oom"


def test_completed_without_output_is_not_a_success():
    status = JobStatus.model_validate({"id": "j", "status": "COMPLETED"})
    assert not status.succeeded
    assert "without an output" in status.failure_message()


def test_structured_error_is_kept_as_json_text():
    status = JobStatus.model_validate({"id": "j", "status": "FAILED", "error": {"type": "OOM"}})
    assert status.error == '{"type": "OOM"}'


def test_base_id_drops_the_suffix():
    status = JobStatus(id="60902e6c-08a1-426e-9cb9-9eaec90f5e2b-e2", status="IN_QUEUE")
    assert status.base_id == "60902e6c-08a1-426e-9cb9-9eaec90f5e2b"
