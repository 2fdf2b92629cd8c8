"""Webhook bodies become registry evidence the same way polled statuses do."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lora_pipeline.webhook.inbox import job_report_from_body
from lora_pipeline.webhook.urls import redact, webhook_url

LEGACY_WEBHOOKS = Path("/work/shared/fixtures/legacy/webhooks")
AT = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


def test_a_completed_body_becomes_a_webhook_report():
    body = {
        "id": "26945dbf-4e87-4574-ad26-b1f71e865942",
        "status": "COMPLETED",
        "delayTime": 812,
        "executionTime": 1534021,
        "output": {"lora_key": "loras/style_59/style_59_vV3.safetensors"},
    }
    report = job_report_from_body(body, AT)
    assert (report.job_id, report.status, report.source) == (body["id"], "COMPLETED", "webhook")
    assert (report.delay_time_ms, report.execution_time_ms) == (812, 1534021)
    assert report.output == body["output"] and report.error is None


@pytest.mark.skipif(not LEGACY_WEBHOOKS.exists(), reason="legacy fixtures not present")
def test_the_legacy_failed_webhook_keeps_its_error():
    body = json.loads((LEGACY_WEBHOOKS / "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10.json").read_text())
    report = job_report_from_body(body, AT)
    assert report.status == "FAILED" and report.error == "CUDA out of memory"


def test_a_completed_body_with_an_error_output_reports_the_error():
    body = {"id": "j-u1", "status": "COMPLETED", "output": {"error": "no images"}}
    assert job_report_from_body(body, AT).error == "no images"


def test_webhook_url_carries_the_token():
    assert webhook_url("https://hooks.example.com", "t0k") == "https://hooks.example.com/webhooks/runpod?token=t0k"
    assert webhook_url("https://h.example/custom/path?x=1", "t") == "https://h.example/custom/path?x=1&token=t"


def test_redact_hides_the_token():
    assert "t0k" not in redact(webhook_url("https://hooks.example.com", "t0k"))
