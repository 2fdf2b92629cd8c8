"""Training requests an app gets wrong are refused before anything reaches Dagster or the store."""

from __future__ import annotations

import pytest

from lora_pipeline.dataset.ingest import ingest_dataset, sample_dataset_path

from .conftest import running_api

STYLE = "app_style"


@pytest.fixture
def api(local_store):
    ingest_dataset(local_store, STYLE, sample_dataset_path())
    with running_api(local_store) as running:  # Dagster: a dead port, never reached by these
        yield running


@pytest.mark.parametrize(
    "webhook", ["ftp://app.example/hook", "app.example/hook", "https://", "javascript:alert(1)", 42]
)
def test_a_webhook_that_is_not_http_is_refused(api, webhook):
    answer = api.call("POST", f"/v1/styles/{STYLE}/trainings", json={"webhook": webhook})
    assert answer.status_code == 422
    assert answer.json()["error"] == f"webhook: expected an http(s) URL with a host, got {webhook!r}"
    assert not list(api.store.list("api/"))


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"rank": 0}, "params.rank: Input should be greater than or equal to 1"),
        ({"no_such": 1}, "params.no_such: Extra inputs are not permitted"),
        ([1], "params: expected an object"),
    ],
)
def test_bad_params_are_named(api, params, why):
    answer = api.call("POST", f"/v1/styles/{STYLE}/trainings", json={"params": params})
    assert answer.status_code == 422 and answer.json()["error"].startswith(why)


def test_a_style_without_a_dataset_is_409(api):
    answer = api.call("POST", "/v1/styles/empty_style/trainings", json={})
    assert answer.status_code == 409 and "has no dataset" in answer.json()["error"]


def test_a_webhook_needs_a_signing_secret(local_store):
    ingest_dataset(local_store, STYLE, sample_dataset_path())
    with running_api(local_store, webhook_secret=None) as api:
        answer = api.call("POST", f"/v1/styles/{STYLE}/trainings", json={"webhook": "https://app.example/h"})
        assert answer.status_code == 422 and "LORA_API_WEBHOOK_SECRET" in answer.json()["error"]


def test_an_unreachable_dagster_is_a_502_naming_it(api):
    answer = api.call("POST", f"/v1/styles/{STYLE}/trainings", json={})
    assert answer.status_code == 502 and answer.json()["error"].startswith(
        "Dagster at http://127.0.0.1:9 is unreachable"
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (
            {"baseModel": "tiny-sdxl", "modelFamily": "flux1"},
            "model_family 'flux1' does not match base_model 'tiny-sdxl', a 'sdxl' model",
        ),
        ({"baseModel": "tiny", "modelFamily": "sd5"}, "model_family 'sd5' is unknown"),
        ({"baseModel": "tiny", "params": {"timestep_shift": 3.0}}, "timestep_shift applies to the flow-matching"),
    ],
)
def test_a_family_base_mismatch_is_a_400_naming_both(api, body, why):
    answer = api.call("POST", f"/v1/styles/{STYLE}/trainings", json=body)
    assert answer.status_code == 400 and answer.json()["error"].startswith(why)
    assert "\n" not in answer.json()["error"]
