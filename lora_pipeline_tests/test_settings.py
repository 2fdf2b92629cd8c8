"""The one settings object (lora_pipeline/settings.py): today's defaults, one error line per bad
variable wherever the project starts (the CLI, the Dagster definitions, the webhook server, the
worker), nothing else reading the environment, and the README's table generated from it."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_pipeline.settings import (
    README_BEGIN,
    README_END,
    WRITE_README_COMMAND,
    Settings,
    SettingsError,
    env_names,
    get_settings,
    load_settings,
    readme_with_table,
)

REPO = Path(__file__).resolve().parents[1]

# (variables set, the one line that must name them), by kind of value.
BAD = {
    "number": ({"LORA_S3_READ_TIMEOUT": "abc"}, "LORA_S3_READ_TIMEOUT='abc': expected a number of seconds above 0"),
    "whole-number": ({"AWS_MAX_ATTEMPTS": "many"}, "AWS_MAX_ATTEMPTS='many': expected a whole number of at least 1"),
    "url": (
        {"LORA_PUBLIC_BASE_URL": "cdn.example.com"},
        "LORA_PUBLIC_BASE_URL='cdn.example.com': expected an http(s) URL",
    ),
    "url-fallback-name": (
        {"AWS_ENDPOINT_URL": "s3.example.com"},
        "AWS_ENDPOINT_URL='s3.example.com': expected an http(s) URL",
    ),
    "storage-url": (
        {"LORA_STORAGE_URL": "ftp://somewhere"},
        "LORA_STORAGE_URL='ftp://somewhere': unsupported scheme: use s3://, file:// or a plain path",
    ),
    "enum": (
        {"LORA_S3_ADDRESSING_STYLE": "sideways"},
        "LORA_S3_ADDRESSING_STYLE='sideways': expected one of auto, path, virtual",
    ),
    "layout": ({"LORA_PRIMARY_FORMAT": "ckpt"}, "LORA_PRIMARY_FORMAT='ckpt': expected one of kohya, diffusers"),
    "boolean": ({"LORA_S3_ACCELERATE": "maybe"}, "LORA_S3_ACCELERATE='maybe': expected true or false"),
    "range": (
        {"LORA_WEBHOOK_RETENTION_DAYS": "0"},
        "LORA_WEBHOOK_RETENTION_DAYS='0': expected a number of days above 0 (up to 36500)",
    ),
    "range-high": (
        {"LORA_GPU_POOL_LIMIT": "20000"},
        "LORA_GPU_POOL_LIMIT='20000': expected a whole number from 1 to 10000",
    ),
    "cron": (
        {"LORA_RECONCILE_CRON": "hourly"},
        "LORA_RECONCILE_CRON='hourly': expected a cron expression of 5 fields, e.g. '0 * * * *'",
    ),
    "endpoint-without-key": (
        {"RUNPOD_ENDPOINT_ID": "abc123"},
        "RUNPOD_ENDPOINT_ID='abc123': RUNPOD_API_KEY is not set (the RunPod backend needs a key)",
    ),
}
PYDANTIC_WORDING = ("Value error", "Input should", "validation error", "pydantic", "Traceback")


def _set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("env", "line"), BAD.values(), ids=BAD.keys())
def test_a_bad_value_is_one_line_naming_the_variable(env, line):
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    assert str(raised.value) == line
    assert not any(word in line for word in PYDANTIC_WORDING)


def test_several_bad_values_give_a_line_each():
    with pytest.raises(SettingsError) as raised:
        load_settings({"LORA_S3_READ_TIMEOUT": "abc", "LORA_PRIMARY_FORMAT": "ckpt"})
    assert str(raised.value).splitlines() == [BAD["layout"][1], BAD["number"][1]]


def test_defaults_are_the_ones_the_code_had():
    from lora_pipeline.backends.runpod_client import DEFAULT_BASE_URL
    from lora_pipeline.lifecycle.housekeeping import Retention
    from lora_pipeline.registry.layouts import DEFAULT_PRIMARY
    from lora_pipeline.storage.s3 import S3Options

    settings = load_settings({})
    assert S3Options.from_settings(settings) == S3Options()
    assert Retention.from_settings(settings) == Retention()
    assert (settings.storage_url, settings.primary_format, settings.runpod_base_url) == (
        ".lora_store",
        DEFAULT_PRIMARY,
        DEFAULT_BASE_URL,
    )
    assert (settings.reconcile_cron, settings.gpu_pool_limit, settings.transfer_concurrency) == ("0 * * * *", 2, 16)
    assert (settings.store_breaker_failures, settings.store_breaker_reset_s) == (5, 30.0)
    assert settings.cache_dir == Path.home() / ".cache" / "lora_pipeline"
    assert settings.local_jobs_dir_or_default == Path(".lora_jobs")
    assert settings.training_backend == "local" and not settings.storage_url_is_set
    assert load_settings({"LORA_STORAGE_URL": "/srv/store"}).local_jobs_dir_or_default == Path("/srv/.lora_jobs")


def test_an_empty_value_means_the_default_and_a_fallback_name_is_read():
    assert load_settings({"LORA_S3_READ_TIMEOUT": "", "AWS_MAX_ATTEMPTS": ""}).s3_read_timeout == 60.0
    assert load_settings({"AWS_ENDPOINT_URL": "http://a"}).s3_endpoint_url == "http://a"
    assert (
        load_settings({"AWS_ENDPOINT_URL_S3": "http://b", "AWS_ENDPOINT_URL": "http://a"}).s3_endpoint_url == "http://b"
    )


def test_on_a_runpod_worker_the_platforms_endpoint_id_needs_no_key():
    settings = load_settings(
        {
            "RUNPOD_ENDPOINT_ID": "abc123",
            "RUNPOD_POD_ID": "pod",
            "RUNPOD_WEBHOOK_POST_OUTPUT": "https://api.runpod.ai/v2/x",
        }
    )
    assert settings.under_runpod


def test_every_field_has_a_variable_a_description_and_what_it_expects():
    names = [name for field in Settings.model_fields for name in env_names(field)]
    assert len(names) == len(set(names)), "a variable is read by two fields"
    for field, info in Settings.model_fields.items():
        assert info.description and info.json_schema_extra["expected"], field
        assert all(name.isupper() for name in env_names(field)), field


def test_secrets_are_not_shown():
    settings = load_settings(
        {
            "RUNPOD_API_KEY": "sekrit-key",
            "RUNPOD_ENDPOINT_ID": "ep",
            "LORA_STORAGE_URL": "s3://bucket/p",
            "LORA_WEBHOOK_TOKEN": "sekrit-token",
        }
    )
    assert "sekrit" not in repr(settings) and "sekrit" not in str(settings)


def test_get_settings_parses_once_per_environment(monkeypatch, tmp_path):
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path))
    assert get_settings() is not first and get_settings().storage_url == str(tmp_path)
    get_settings.cache_clear()
    assert get_settings().storage_url == str(tmp_path)


# -- fails at start: the CLI (and the webhook server it starts), the definitions, the worker ----


@pytest.mark.parametrize("kind", ["number", "url", "storage-url", "enum", "range", "endpoint-without-key"])
@pytest.mark.parametrize("command", [["registry", "list"], ["webhook", "serve"]], ids=["cli", "webhook-server"])
def test_the_command_refuses_to_start_with_the_line_and_status_2(monkeypatch, kind, command):
    from lora_pipeline.cli import main

    env, line = BAD[kind]
    _set(monkeypatch, env)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert result.stderr == line + "\n" and result.stdout == ""


def test_the_installed_command_prints_no_traceback(tmp_path):
    env, line = BAD["number"]
    result = subprocess.run(
        [sys.executable, "-c", "from lora_pipeline.cli import main; main()", "dataset", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
        timeout=120,
    )
    assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "")


@pytest.mark.parametrize("kind", ["number", "url", "enum", "range", "cron", "endpoint-without-key"])
def test_loading_the_definitions_fails_with_the_line(monkeypatch, kind):
    importlib.import_module("lora_pipeline.definitions")  # every defs module loaded with good settings
    monkeypatch.delitem(sys.modules, "lora_pipeline.definitions")
    env, line = BAD[kind]
    _set(monkeypatch, env)
    with pytest.raises(SettingsError) as raised:
        importlib.import_module("lora_pipeline.definitions")
    assert str(raised.value) == line


def test_loading_the_definitions_in_a_fresh_process_fails_with_the_line(tmp_path):
    env, line = BAD["storage-url"]
    result = subprocess.run(
        [sys.executable, "-c", "import lora_pipeline.definitions"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"lora_pipeline.settings.SettingsError: {line}"


def test_the_worker_refuses_at_start_and_fails_jobs_with_the_line(monkeypatch, capsys):
    from lora_pipeline.worker import handler as worker

    env, line = BAD["number"]
    _set(monkeypatch, env)
    with pytest.raises(SystemExit) as raised:
        worker.main()
    assert raised.value.code == 2 and capsys.readouterr().err == f"worker: {line}\n"
    assert worker.handler({"id": "job-1", "input": {}}) == {"error": f"worker settings: {line}"}


# -- nothing else reads the environment --------------------------------------------------------


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines reading os.environ / os.getenv (copying the environment for a child, or setting a
    variable, is not reading a setting)."""

    def is_environ(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "environ"
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )

    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (
                (node.func.attr in ("get", "setdefault", "pop") and is_environ(node.func.value))
                or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name) and node.func.value.id == "os")
            )
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            lines.append(node.lineno)
    return lines


def test_only_the_settings_module_reads_the_environment():
    package = REPO / "lora_pipeline"
    found = {
        str(path.relative_to(REPO)): lines
        for path in sorted(package.rglob("*.py"))
        if path != package / "settings.py" and (lines := _environment_reads(ast.parse(path.read_text())))
    }
    assert found == {}, f"read these through lora_pipeline.settings.get_settings() instead: {found}"


# -- the README's table ------------------------------------------------------------------------


def test_the_readme_settings_table_is_generated_from_the_settings():
    text = (REPO / "README.md").read_text()
    assert README_BEGIN in text and README_END in text
    assert readme_with_table(text) == text, f"README.md's settings table is stale: run `{WRITE_README_COMMAND}`"


def test_the_generator_rewrites_only_the_block(tmp_path):
    from lora_pipeline.settings import main

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\n| old |\n{README_END}\nafter\n")
    assert main(["--write-readme", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# x\n\nbefore\n{README_BEGIN}\n| variable | default | meaning |\n")
    assert text.endswith(f"|\n{README_END}\nafter\n") and "| old |" not in text
    assert "`LORA_S3_READ_TIMEOUT` | `60` (s) |" in text


def test_the_retention_config_override_is_checked_too():
    from lora_pipeline.lifecycle.housekeeping import Retention

    assert Retention.from_settings(load_settings({}), locks_days=0.5).locks == timedelta(hours=12)
    with pytest.raises(SettingsError, match=r"^locks retention=0: expected a number of days above 0"):
        Retention.from_settings(load_settings({}), locks_days=0)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"RUNPOD_API_KEY": "k"},
            "RUNPOD_API_KEY is set but RUNPOD_ENDPOINT_ID is not: training would run on the local backend; "
            "set RUNPOD_ENDPOINT_ID to train on RunPod, or unset RUNPOD_API_KEY",
        ),
        (
            {"RUNPOD_API_KEY": "k", "RUNPOD_ENDPOINT_ID": "ep", "LORA_STORAGE_URL": "/data/store"},
            "RUNPOD_ENDPOINT_ID is set but LORA_STORAGE_URL is the local directory '/data/store', which a "
            "RunPod worker cannot reach: set it to s3://bucket/prefix",
        ),
        (
            {"LORA_STORAGE_URL": "s3:/nobucket"},
            "LORA_STORAGE_URL='s3:/nobucket': 's3:/nobucket' looks like a mistyped URL",
        ),
        ({"LORA_STORAGE_URL": "file:relative"}, "'file:relative' looks like a mistyped URL"),
    ],
)
def test_a_runpod_pairing_that_cannot_work_or_a_mistyped_store_url_fails_at_start_in_one_line(environ, message):
    """Issue 23: bad RunPod settings failed late, in a 77-line traceback; ``s3:/nobucket`` became a
    local folder. Both fail when the settings are read, one line each."""
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_the_settings_check_says_which_backend_and_store_are_used(capsys):
    from lora_pipeline.settings import main

    assert main(["--check"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("store: ") and "training: the local backend" in line
    assert (
        load_settings({"RUNPOD_API_KEY": "k", "RUNPOD_ENDPOINT_ID": "ep", "LORA_STORAGE_URL": "s3://b/p"}).summary()
        == "store: s3://b/p; training: RunPod endpoint ep"
    )
    assert load_settings({"LORA_STORAGE_URL": "C:/stores/lora"}).storage_url == "C:/stores/lora"  # a drive letter
