"""Issue 22, defect 4: every name check refuses the same hostile list.

``re.match("^…$")`` matches before a final newline, so ``'nl\\n'`` passed as a style (a folder
``datasets/nl\\n/`` and a Dagster partition), a job id ending in a newline reached the store
(503, deliver again, instead of 400), and the style ``.`` passed too. Every check is a
``fullmatch`` now; this one list goes through each of them, and each must refuse every entry
(or, for builders that make a name safe, never let the hostile text into the key).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.registry.aliases import InvalidAliasName, validate_alias
from lora_pipeline.registry.names import (
    InvalidStyleName,
    companion_suffix,
    parse_lora_filename,
    parse_version_name,
    validate_style,
)
from lora_pipeline.storage.base import InvalidKey, validate_key, validate_stored_key
from lora_pipeline.storage import keys
from lora_pipeline.webhook.app import create_app
from lora_pipeline.webhook.inbox import InvalidWebhook, validate_job_id
from lora_pipeline.worker.base_model import describe_source
from lora_pipeline.worker.errors import WorkerInputError

from lora_pipeline_tests.webhook.test_webhook_app import TOKEN, post, written

GOOD = "style_59"
UUID = "26945dbf-4e87-4574-ad26-b1f71e865942"

# Each is a good name made hostile, so a check that looks only at a prefix passes it.
HOSTILE = [
    f"{GOOD}\n",
    f"{GOOD}\r",
    f"{GOOD}\r\n",
    f"{GOOD}\x00",
    f"{GOOD}\t",
    f"{GOOD} ",
    f" {GOOD}",
    ".",
    "..",
    "/",
    f"../{GOOD}",
    f"{GOOD}/..",
    "",
    "\n",
    f"{GOOD}\u2028",  # line separator
    f"{GOOD}\u200b",  # zero-width space
    "styl\u0435_59",  # Cyrillic е
    "\uff53tyle_59",  # fullwidth s
    "style_\u0665\u0669",  # Arabic-Indic digits 59
    "ſtyle_59",  # long s (uppercases to S)
    "a" * 1000,
]


def refuses(check: Callable[[str], object], errors: type[BaseException] | tuple[type[BaseException], ...]):
    def run(name: str) -> None:
        with pytest.raises(errors):
            check(name)

    return run


CHECKS: dict[str, Callable[[str], None]] = {
    "validate_style": refuses(validate_style, InvalidStyleName),
    "validate_alias": refuses(lambda n: validate_alias(n.replace(GOOD, "production")), InvalidAliasName),
    "validate_job_id": refuses(lambda n: validate_job_id(n.replace(GOOD, UUID)), InvalidWebhook),
    "validate_key": refuses(lambda n: validate_key(f"datasets/{n}/a.png"), InvalidKey),
    "keys.registry_key": refuses(keys.registry_key, InvalidStyleName),
    "keys.lora_key": refuses(lambda n: keys.lora_key(n, 1), InvalidStyleName),
    "keys.dataset_prefix": refuses(lambda n: keys.dataset_prefix(n, "ab"), InvalidStyleName),
    "keys.run_marker_key": refuses(lambda n: keys.run_marker_key("s", "V1", n.replace(GOOD, UUID)), ValueError),
    "keys.run_marker_prefix": refuses(lambda n: keys.run_marker_prefix("s", n.replace(GOOD, "V1")), ValueError),
    "keys.comparison_key": refuses(lambda n: keys.comparison_key("s", n.replace(GOOD, "V1"), "V2"), ValueError),
    "hub id": refuses(lambda n: describe_source(f"org/{n}"), WorkerInputError),
}


def _is(value: object) -> Callable[[str], None]:
    def run(name: str) -> None:
        assert value is None, name

    return run


@pytest.mark.parametrize("name", HOSTILE, ids=ascii)
@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
def test_every_name_check_refuses_the_hostile_list(check, name):
    check(name)


@pytest.mark.parametrize("name", HOSTILE, ids=ascii)
def test_file_name_parsers_find_no_version_in_a_hostile_name(name):
    """A listed file decides a version's completion: no lookalike of its name may count."""
    hostile_version = name.replace(GOOD, "v4")
    assert parse_lora_filename(GOOD, f"{GOOD}_{hostile_version}.safetensors") is None
    assert parse_lora_filename(GOOD, f"{GOOD}_v4.safetensors{name}") is None or name == ""
    assert companion_suffix(f"{GOOD}_v4_kohya.safetensors{name}") is None or name == ""
    # An operator's version name may carry spaces around it; nothing else gets through.
    assert parse_version_name(hostile_version) is None or hostile_version.strip() == "v4"


@pytest.mark.parametrize("name", HOSTILE, ids=ascii)
def test_checkpoint_keys_never_carry_a_hostile_name(name):
    prefix = keys.checkpoint_prefix(GOOD, name.replace(GOOD, "V1"), name)
    validate_key(prefix + "step.pt")  # hashed where unsafe: always a key the pipeline can build


def test_the_stores_refuse_only_what_escapes_or_aliases():
    """The stores take any name a tool can write (defect 1), but never one that escapes."""
    for name in (".", "..", "", f"{GOOD}\x00", f"../{GOOD}", f"{GOOD}/.."):
        with pytest.raises(InvalidKey):
            validate_stored_key(f"webhooks/inbox/{name}")


@pytest.mark.parametrize("name", [f"nl\n", "."], ids=ascii)
def test_dataset_add_refuses_the_style(tmp_path, monkeypatch, name):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(main, ["dataset", "add", name, str(tmp_path / "images")])
    assert result.exit_code != 0 and "invalid style name" in result.output
    assert not (tmp_path / "store" / "datasets").exists()


@pytest.mark.parametrize("job", [f"{UUID}\n", f"{UUID}-e1\n", f"{UUID}\r"], ids=ascii)
def test_a_webhook_whose_id_ends_in_a_newline_is_400_and_writes_nothing(local_store, job):
    response = post(create_app(local_store, TOKEN), json.dumps({"id": job, "status": "COMPLETED"}).encode())
    assert response.status_code == 400 and "invalid job id" in response.text
    assert written(local_store) == []
