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


# -- replay -------------------------------------------------------------------------------

REPLAY_JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"


@pytest.fixture
def replay_store(monkeypatch, tmp_path):
    from lora_pipeline.storage.local import LocalStore

    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    return LocalStore(tmp_path / "store")


def test_replay_stores_good_files_reports_duplicates_and_names_bad_ones(replay_store, tmp_path):
    import json

    from lora_pipeline.storage.keys import WEBHOOK_INBOX
    from lora_pipeline.webhook.inbox import list_inbox

    good = tmp_path / f"{REPLAY_JOB}.json"
    good.write_text(json.dumps({"id": REPLAY_JOB, "status": "COMPLETED", "output": {"lora_key": "k"}}))
    again = tmp_path / "copy-of-the-same.json"
    again.write_bytes(good.read_bytes())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": REPLAY_JOB, "status": "FAILED", "delayTime": "soon"}))
    missing = tmp_path / "missing.json"
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"id": REPLAY_JOB, "status": "FAILED", "error": "oom"}))

    result = CliRunner().invoke(webhook, ["replay", str(good), str(bad), str(again), str(missing), str(failed)])

    assert result.exit_code == 1
    assert f"stored: {good} -> {WEBHOOK_INBOX}/" in result.stdout
    assert f"duplicate: {again}" in result.stdout
    assert f"stored: {failed} -> " in result.stdout
    assert f"error: {bad}: not replayed:" in result.stderr and "delayTime" in result.stderr
    assert f"error: {missing}: cannot read it" in result.stderr
    assert "2 of 5 files not replayed" in result.stderr
    items = list(list_inbox(replay_store))
    assert sorted(i.status for i in items) == ["COMPLETED", "FAILED"]
    assert all(i.problem is None for i in items)
    assert [replay_store.get(i.key).data for i in items if i.status == "COMPLETED"] == [good.read_bytes()]


def test_replay_of_only_good_files_exits_zero_and_is_idempotent(replay_store, tmp_path):
    good = tmp_path / "anything.json"
    good.write_text('{"id": "%s-u1", "status": "FAILED", "error": "boom"}' % REPLAY_JOB)
    first = CliRunner().invoke(webhook, ["replay", str(good)])
    second = CliRunner().invoke(webhook, ["replay", str(good)])
    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    assert "stored:" in first.stdout and "duplicate:" in second.stdout


def test_replay_needs_at_least_one_file(replay_store):
    result = CliRunner().invoke(webhook, ["replay"])
    assert result.exit_code == 2 and "Missing argument 'FILES...'" in result.output


def test_replay_names_a_bad_storage_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_STORAGE_URL", "ftp://nowhere")
    good = tmp_path / "anything.json"
    good.write_text('{"id": "%s", "status": "FAILED"}' % REPLAY_JOB)
    result = CliRunner().invoke(webhook, ["replay", str(good)])
    assert result.exit_code != 0 and "LORA_STORAGE_URL" in result.output
