"""`lora-pipeline api serve` refuses to start without what it needs, naming it."""

from __future__ import annotations

from click.testing import CliRunner

from lora_pipeline.cli import main


def serve(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return CliRunner().invoke(main, ["api", "serve", "--port", "1"])


def test_refuses_to_start_without_a_token(monkeypatch, tmp_path):
    result = serve(monkeypatch, tmp_path)
    assert result.exit_code == 2 and "LORA_API_TOKEN is not set" in result.output


def test_refuses_an_admin_token_equal_to_the_app_token(monkeypatch, tmp_path):
    token = "x" * 20
    result = serve(monkeypatch, tmp_path, LORA_API_TOKEN=token, LORA_API_ADMIN_TOKEN=token)
    assert result.exit_code == 2 and "must differ" in result.output


def test_a_bad_webhook_secret_is_named(monkeypatch, tmp_path):
    result = serve(monkeypatch, tmp_path, LORA_API_TOKEN="x" * 20, LORA_API_WEBHOOK_SECRET="not-whsec")
    assert result.exit_code == 2 and "LORA_API_WEBHOOK_SECRET" in result.output and "whsec_" in result.output
