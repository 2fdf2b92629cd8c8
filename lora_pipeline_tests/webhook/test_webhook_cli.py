"""``lora-pipeline webhook serve``: refuses to run open by accident, never logs the token."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_pipeline.cli.webhook import webhook


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Capture what would be handed to uvicorn instead of serving."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    return calls


def test_serve_refuses_to_start_without_a_token(served):
    result = CliRunner().invoke(webhook, ["serve"])
    assert result.exit_code == 2
    assert "LORA_WEBHOOK_TOKEN is not set" in result.output
    assert served == []


def test_serve_starts_with_a_token_and_without_access_logs(served, monkeypatch):
    monkeypatch.setenv("LORA_WEBHOOK_TOKEN", "a-long-enough-secret-token")
    result = CliRunner().invoke(webhook, ["serve", "--host", "0.0.0.0", "--port", "9123"])
    assert result.exit_code == 0, result.output
    (call,) = served
    assert (call["host"], call["port"], call["access_log"]) == ("0.0.0.0", 9123, False)
    assert "a-long-enough-secret-token" not in result.output


def test_serve_can_run_open_when_asked_explicitly(served):
    result = CliRunner().invoke(webhook, ["serve", "--insecure-no-token"])
    assert result.exit_code == 0, result.output
    assert len(served) == 1


def test_a_bad_storage_setting_is_named(served, monkeypatch):
    monkeypatch.setenv("LORA_WEBHOOK_TOKEN", "a-long-enough-secret-token")
    monkeypatch.setenv("LORA_STORAGE_URL", "ftp://nowhere")
    result = CliRunner().invoke(webhook, ["serve"])
    assert result.exit_code != 0 and "LORA_STORAGE_URL" in result.output
