"""Versions, downloads and the admin operations over real HTTP, on both stores."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from lora_pipeline.dataset.ingest import IngestOptions, ingest_dataset, sample_dataset_path
from lora_pipeline.registry_store.documents import RegistryStore

from ..registry.test_aliases_and_tombstones import S, kohya_key, main_key, seed
from .conftest import ADMIN, TOKEN, running_api


@pytest.fixture
def seeded(store):
    seed(store)
    RegistryStore(store).move_alias(S, "production", action="promote", version="V2", by="test")
    with running_api(store) as api:
        yield api


def test_versions_list_and_one_by_name_or_alias(seeded):
    listed = seeded.call("GET", f"/v1/styles/{S}/versions").json()
    assert listed["aliases"] == {"production": "V2"}
    assert [(v["name"], v["status"]) for v in listed["versions"]] == [
        ("V1", "completed"),
        ("V2", "completed"),
        ("V3", "completed"),
        ("V4", "failed"),
    ]
    by_alias = seeded.call("GET", f"/v1/styles/{S}/versions/@production").json()
    assert (
        by_alias["name"] == "V2"
        and by_alias["aliases"] == ["production"]
        and set(by_alias["files"])
        == {
            "kohya",
            "diffusers",
        }
    )
    assert seeded.call("GET", f"/v1/styles/{S}/versions/v3").json()["name"] == "V3"


@pytest.mark.parametrize(
    ("ref", "status", "why"),
    [
        ("@staging", 404, "has no alias @staging (aliases: @production)"),
        ("V9", 404, "has no version V9"),
        ("x", 404, "neither"),
    ],
)
def test_unknown_versions_and_aliases_are_named(seeded, ref, status, why):
    answer = seeded.call("GET", f"/v1/styles/{S}/versions/{ref}")
    assert answer.status_code == status and why in answer.json()["error"]


def test_a_style_without_versions_is_404(seeded):
    answer = seeded.call("GET", "/v1/styles/nothing_here/versions")
    assert answer.status_code == 404 and answer.json()["error"] == "style 'nothing_here' has no versions yet"


@pytest.mark.parametrize(("layout", "key"), [("kohya", kohya_key(2)), ("diffusers", main_key(2))])
def test_download_urls_by_alias_in_each_layout_fetch_the_file(seeded, layout, key):
    answer = seeded.call("GET", f"/v1/styles/{S}/versions/@production/download", params={"format": layout})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["version"], body["layout"], body["key"]) == ("V2", layout, key)
    fetched = seeded.client.get(body["url"])
    assert fetched.status_code == 200 and fetched.content == seeded.store.get(key).data
    assert len(fetched.content) == body["size"]


def test_download_refusals_are_named(seeded):
    failed = seeded.call("GET", f"/v1/styles/{S}/versions/V4/download")
    assert failed.status_code == 409 and failed.json()["error"] == f"{S} V4 is failed: it has no LoRA file"
    bad = seeded.call("GET", f"/v1/styles/{S}/versions/V1/download", params={"format": "ckpt"})
    assert bad.status_code == 400 and "format" in bad.json()["error"]
    long = seeded.call("GET", f"/v1/styles/{S}/versions/V1/download", params={"expiresIn": "999999999"})
    assert long.status_code == 400 and "expiresIn" in long.json()["error"]


def test_a_local_download_url_expires_and_cannot_be_put_to(local_store):
    seed(local_store)
    with running_api(local_store) as api:
        body = api.call("GET", f"/v1/styles/{S}/versions/V1/download", params={"expiresIn": 1}).json()
        assert api.client.put(body["url"], content=b"x").status_code == 403
        import time

        time.sleep(1.1)
        expired = api.client.get(body["url"])
        assert expired.status_code == 403 and expired.json()["error"] == "this URL has expired"


def test_a_dataset_version_downloads_as_one_zip(store):
    report = ingest_dataset(store, S, sample_dataset_path(), options=IngestOptions(trigger_word="geo style"))
    with running_api(store) as api:
        for name in ("current", report.dataset_hash):
            answer = api.call("GET", f"/v1/styles/{S}/datasets/{name}.zip")
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
            assert "content-length" not in answer.headers  # streamed
            archive = zipfile.ZipFile(io.BytesIO(answer.content))
            names = archive.namelist()
            assert len([n for n in names if n.endswith((".png", ".jpg"))]) == 8 and "manifest.json" in names
            assert archive.read("images/geo_01.png") == (sample_dataset_path() / "geo_01.png").read_bytes()
            assert archive.read("images/geo_01.txt").decode().startswith("geo")
            assert json.loads(archive.read("manifest.json"))["datasetHash"] == report.dataset_hash
        assert api.call("GET", f"/v1/styles/{S}/datasets/{'0' * 64}.zip").status_code == 404
        assert api.call("GET", f"/v1/styles/{S}/datasets/nothex.zip").status_code == 404
        assert api.call("GET", "/v1/styles/other/datasets/current.zip").status_code == 404


def test_promote_rollback_delete_with_the_admin_token(seeded):
    path = f"/v1/styles/{S}/aliases/production"
    moved = seeded.call("POST", f"{path}/promote", token=ADMIN, json={"version": "V3", "reason": "better", "by": "ana"})
    assert moved.json() == {"style": S, "alias": "production", "version": "V3", "previous": "V2", "moved": True}
    back = seeded.call("POST", f"{path}/rollback", token=ADMIN)
    assert back.status_code == 200 and back.json()["version"] == "V2"
    history = RegistryStore(seeded.store).read(S)[0].alias_history
    assert [(e.action, e.version, e.by, e.reason) for e in history][-2:] == [
        ("promote", "V3", "api: ana", "better"),
        ("rollback", "V2", "api", None),
    ]
    refused = seeded.call("DELETE", f"/v1/styles/{S}/versions/V2", token=ADMIN)
    assert refused.status_code == 409 and "production" in refused.json()["error"]
    deleted = seeded.call("DELETE", f"/v1/styles/{S}/versions/V1", token=ADMIN, json={"reason": "old"})
    assert deleted.status_code == 200 and set(deleted.json()["removed"]) == {main_key(1), kohya_key(1)}
    assert seeded.store.head(main_key(1)) is None
    assert seeded.call("GET", f"/v1/styles/{S}/versions/V1").json()["status"] == "deleted"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/v1/styles/{S}/aliases/production/promote"),
        ("POST", f"/v1/styles/{S}/aliases/production/rollback"),
        ("DELETE", f"/v1/styles/{S}/versions/V1"),
    ],
)
def test_admin_operations_refuse_the_app_token(seeded, method, path):
    answer = seeded.call(method, path, token=TOKEN, json={"version": "V3"})
    assert answer.status_code == 403 and "admin token" in answer.json()["error"]
    assert RegistryStore(seeded.store).read(S)[0].aliases == {"production": "V2"}
    assert seeded.store.head(main_key(1)) is not None


def test_without_an_admin_token_admin_operations_are_off(store):
    seed(store)
    with running_api(store, admin_token=None) as api:
        answer = api.call("POST", f"/v1/styles/{S}/aliases/production/rollback", token=TOKEN)
        assert answer.status_code == 403 and "no LORA_API_ADMIN_TOKEN" in answer.json()["error"]


def test_admin_refusals_are_named(seeded):
    path = f"/v1/styles/{S}/aliases/production/promote"
    assert "version: the version" in seeded.call("POST", path, token=ADMIN, json={}).json()["error"]
    failed = seeded.call("POST", path, token=ADMIN, json={"version": "V4"})
    assert failed.status_code == 409 and "V4" in failed.json()["error"]
    bad_alias = seeded.call("POST", f"/v1/styles/{S}/aliases/Bad Alias!/promote", token=ADMIN, json={"version": "V1"})
    assert bad_alias.status_code == 400


def test_the_openapi_document_names_every_route(seeded):
    document = seeded.call("GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.") and document["components"]["securitySchemes"]["bearer"]
    assert {
        "/v1/styles/{style}/uploads",
        "/v1/styles/{style}/uploads/{upload_id}/complete",
        "/v1/styles/{style}/trainings",
        "/v1/styles/{style}/trainings/{version}/cancel",
        "/v1/styles/{style}/versions/{ref}",
        "/v1/styles/{style}/versions/{ref}/download",
        "/v1/styles/{style}/datasets/{dataset}.zip",
        "/v1/styles/{style}/aliases/{alias}/promote",
        "/v1/files/{token}",
        "/openapi.json",
    } <= set(document["paths"])
    assert document["paths"]["/v1/styles/{style}/uploads"]["post"]["responses"]["201"]


def test_unknown_routes_and_methods_answer_json(seeded):
    assert seeded.call("GET", "/v2/nothing").json()["status"] == 404
    assert seeded.call("PUT", f"/v1/styles/{S}/versions").status_code == 405


def test_a_version_names_its_family_and_base_model(store):
    from datetime import UTC, datetime

    from lora_pipeline.registry.evidence import Submission

    seed(store)
    RegistryStore(store).apply(S, [Submission(S, 5, "r5", None, "ab", {}, datetime.now(UTC), "sd3", "tiny-sd3")])
    with running_api(store) as api:
        shown = api.call("GET", f"/v1/styles/{S}/versions/V5").json()
        assert (shown["family"], shown["baseModel"], shown["familyFrom"]) == ("sd3", "tiny-sd3", "request")
        listed = api.call("GET", f"/v1/styles/{S}/versions").json()["versions"]
        assert "family" not in listed[0]  # recorded before the fields existed: they are left out
