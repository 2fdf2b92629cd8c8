"""Uploads over real HTTP: declare, PUT, complete → a dataset version; and every bad input an app sends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from lora_pipeline.dataset.ingest import IngestOptions, ingest_dataset
from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.defs.discovery_sensors import _incoming_fingerprints
from lora_pipeline.lifecycle.housekeeping import housekeep
from lora_pipeline.lifecycle.uploads import prune_uploads, read_upload
from lora_pipeline.storage.keys import upload_record_key

from ..registry.test_aliases_and_tombstones import all_at_once
from .conftest import TOKEN, content_type, declare, put_all, sample_files, upload

STYLE = "app_style"


def start(api, files, style=STYLE):
    answer = api.call("POST", f"/v1/styles/{style}/uploads", json=declare(files))
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_upload_then_complete_makes_the_current_dataset_with_the_ingest_report(api):
    files = sample_files()
    done = upload(api, STYLE, files)
    manifest = current_dataset(api.store, STYLE)
    assert manifest is not None and done["datasetHash"] == manifest.dataset_hash
    assert done["state"] == "completed" and done["report"]["stats"]["image_count"] == 8 == len(manifest.images)
    assert done["report"]["rejected"] == []
    # The same images as `dataset add` of the folder: one code path, one content hash.
    assert ingest_dataset(api.store, "same", files[0].parent).dataset_hash == manifest.dataset_hash
    # The upload's files are gone from incoming/ (the dataset version holds them).
    assert not list(api.store.list(f"incoming/{STYLE}/"))


def test_rejected_files_are_reported_with_reasons(api, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    done = upload(api, STYLE, [*sample_files(), broken])
    assert done["report"]["rejected"] == [{"file": "broken.png", "reason": done["report"]["rejected"][0]["reason"]}]
    assert "PNG" in done["report"]["rejected"][0]["reason"] or "image" in done["report"]["rejected"][0]["reason"]


def test_nothing_accepted_is_a_422_with_the_report_and_no_dataset(api, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    started = start(api, [broken])
    put_all(api, started, [broken])
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete")
    assert answer.status_code == 422 and "no usable images" in answer.json()["error"]
    assert answer.json()["upload"]["state"] == "rejected"
    assert current_dataset(api.store, STYLE) is None


def test_presigned_put_urls_sign_the_size_and_type(s3_store):
    from .conftest import running_api

    files = sample_files()[:2]
    with running_api(s3_store) as api:
        started = start(api, files)
    for f, path in zip(started["files"], files, strict=True):
        query = parse_qs(urlsplit(f["url"]).query)
        assert query["X-Amz-SignedHeaders"] == ["content-length;content-type;host"]
        assert f["headers"] == {"Content-Length": str(path.stat().st_size), "Content-Type": content_type(path)}
        assert f"/incoming/{STYLE}/{started['uploadId']}/{path.name}" in f["url"]


def test_a_partial_upload_never_becomes_a_dataset(api):
    files = sample_files()
    started = start(api, files)
    put_all(api, {"files": started["files"][:3]}, files)
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete")
    assert answer.status_code == 409
    assert "13 file(s) not ready" in answer.json()["error"] and "geo_02.txt (not uploaded)" in answer.json()["error"]
    assert current_dataset(api.store, STYLE) is None
    # Neither the drop's own ingest nor the discovery sensor sees the half-done upload.
    assert _incoming_fingerprints(api.store) == {}
    shown = api.call("GET", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}").json()
    assert shown["state"] == "open" and len(shown["missing"]) == 13
    # Finishing the PUTs makes it complete.
    put_all(api, started, files)
    assert api.call("POST", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete").status_code == 200


def test_a_drop_beside_an_open_upload_is_ingested_without_it(api):
    files = sample_files()
    started = start(api, files)
    put_all(api, {"files": started["files"][:2]}, files)
    for path in files[2:]:
        api.store.put(f"incoming/{STYLE}/{path.name}", path.read_bytes())
    report = ingest_dataset(api.store, STYLE, f"store:incoming/{STYLE}/")
    assert report.stats.image_count == 7 and report.rejected == []


def test_abandoned_uploads_are_removed_by_housekeeping(api):
    files = sample_files()
    started = start(api, files)
    put_all(api, {"files": started["files"][:4]}, files)
    later = datetime.now(UTC) + timedelta(hours=25)
    assert prune_uploads(api.store, dry_run=True, now=later).abandoned == [started["uploadId"]]
    report = housekeep(api.store, now=later)
    assert report.counts["uploads"] == 1 and not report.problems
    assert not list(api.store.list(f"incoming/{STYLE}/"))
    record, _ = read_upload(api.store, STYLE, started["uploadId"])
    assert record.state == "abandoned"
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete")
    assert answer.status_code == 410 and "abandoned" in answer.json()["error"]


def test_an_upload_under_way_is_never_pruned(api):
    started = start(api, sample_files())
    put_all(api, {"files": started["files"][:4]}, sample_files())
    assert prune_uploads(api.store, now=datetime.now(UTC) + timedelta(hours=23)).keys() == []
    assert len(list(api.store.list(f"incoming/{STYLE}/"))) == 4


def test_two_concurrent_completes_ingest_once(api):
    started = start(api, sample_files())
    put_all(api, started, sample_files())
    path = f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete"
    answers = []
    assert all_at_once(lambda _i: answers.append(api.call("POST", path)), 2) == []
    assert sorted(a.status_code for a in answers) == [200, 409]


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "why"),
    [({}, "missing bearer token"), ({"Authorization": "Bearer nope"}, "wrong bearer token")],
)
def test_wrong_or_missing_token_is_401(api, headers, why):
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads", token=None, headers=headers, json=declare(sample_files()))
    assert answer.status_code == 401 and answer.json()["error"].startswith(why)
    assert not list(api.store.list("api/"))


@pytest.mark.parametrize("path", ["/v1/styles/bad%2Fstyle/uploads", "/v1/styles/..%2F..%2Fx/uploads"])
def test_a_style_name_with_a_slash_is_named(api, path):
    answer = api.call("POST", path, json=declare(sample_files()))
    assert answer.status_code == 400 and "invalid style name" in answer.json()["error"]


def test_a_style_name_with_a_bare_slash_is_no_route(api):
    answer = api.call("POST", "/v1/styles/bad/style/uploads", json=declare(sample_files()))
    assert answer.status_code == 404 and "no '/'" in answer.json()["error"]


def test_a_2_gb_declared_size_is_refused_naming_the_file(api):
    body = {"files": [{"name": "huge.png", "size": 2 * 1024**3, "contentType": "image/png"}]}
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads", json=body)
    assert answer.status_code == 413
    assert answer.json()["error"] == "file 'huge.png': size 2,147,483,648 bytes is not between 1 and 67,108,864"
    assert not list(api.store.list("api/"))


@pytest.mark.parametrize(
    ("file", "why"),
    [
        ({"name": "a/b.png", "size": 10, "contentType": "image/png"}, "one path segment"),
        ({"name": ".hidden.png", "size": 10, "contentType": "image/png"}, "one path segment"),
        ({"name": "a.exe", "size": 10, "contentType": "image/png"}, "neither an image"),
        ({"name": "a.png", "size": 10, "contentType": "text/html"}, "does not match .png"),
        ({"name": "a.png", "size": 0, "contentType": "image/png"}, "is not between 1"),
        ({"name": "a.png", "contentType": "image/png"}, "each entry needs"),
    ],
)
def test_bad_declarations_are_named(api, file, why):
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads", json={"files": [file]})
    assert answer.status_code in (400, 413) and why in answer.json()["error"], answer.text


@pytest.mark.parametrize("upload_id", ["upload-" + "0" * 32, "nope", "upload-../x"])
def test_an_unknown_upload_id_is_404(api, upload_id):
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads/{upload_id}/complete")
    assert answer.status_code == 404 and "upload" in answer.json()["error"]


def test_another_styles_upload_is_unknown(api):
    started = start(api, sample_files())
    answer = api.call("POST", f"/v1/styles/other/uploads/{started['uploadId']}/complete")
    assert answer.status_code == 404 and "does not belong to style 'other'" in answer.json()["error"]


def test_a_second_complete_is_409_with_the_first_report(api):
    files = sample_files()
    started = start(api, files)
    put_all(api, started, files)
    path = f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete"
    first = api.call("POST", path).json()
    again = api.call("POST", path)
    assert again.status_code == 409 and "already completed" in again.json()["error"]
    assert again.json()["upload"]["datasetHash"] == first["datasetHash"]


def test_bad_json_bodies_are_named(api):
    path = f"/v1/styles/{STYLE}/uploads"
    assert "not JSON" in api.call("POST", path, content=b"{nope").json()["error"]
    assert api.call("POST", path, json=[1]).json()["error"] == "expected a JSON object body"
    big = api.call("POST", path, content=b" " * (1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    assert big.status_code == 413


def test_local_put_urls_hold_to_what_they_were_signed_for(local_store):
    from .conftest import running_api

    files = sample_files()[:1]
    with running_api(local_store) as api:
        started = start(api, files)
        f = started["files"][0]
        data = files[0].read_bytes()
        short = api.client.put(f["url"], content=data[:-1], headers={"Content-Type": "image/png"})
        assert short.status_code == 400 and "signed for exactly" in short.json()["error"]
        long = api.client.put(f["url"], content=data + b"x", headers={"Content-Type": "image/png"})
        assert long.status_code == 413
        typed = api.client.put(f["url"], content=data, headers={"Content-Type": "text/plain"})
        assert typed.status_code == 400 and "Content-Type must be image/png" in typed.json()["error"]
        forged = api.client.put(f["url"][:-3] + "AAA", content=data, headers={"Content-Type": "image/png"})
        assert forged.status_code == 403 and "signature" in forged.json()["error"]
        got = api.client.get(f["url"])
        assert got.status_code == 403 and "for PUT, not GET" in got.json()["error"]
        assert not list(local_store.list("incoming/"))
        assert api.client.put(f["url"], content=data, headers=f["headers"]).status_code == 200
        path = f["url"][len(api.url) :]
    with running_api(local_store, token="another-token-0123456789") as api:
        # Changing the API token revokes every URL it signed.
        assert api.client.put(api.url + path, content=data, headers=f["headers"]).status_code == 403


def test_complete_checks_sizes_whatever_wrote_the_files(api):
    files = sample_files()
    started = start(api, files)
    put_all(api, started, files)
    record_key = upload_record_key(started["uploadId"])
    assert api.store.head(record_key) is not None
    api.store.put(f"incoming/{STYLE}/{started['uploadId']}/geo_01.png", b"tampered")
    answer = api.call("POST", f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete")
    assert answer.status_code == 409 and "geo_01.png (8 bytes, declared" in answer.json()["error"]


def test_the_token_is_not_needed_only_for_signed_urls_and_health(api):
    assert api.call("GET", "/healthz", token=None).status_code == 200
    assert api.call("GET", "/openapi.json", token=None).status_code == 401
    assert api.call("GET", "/openapi.json", token=TOKEN).status_code == 200


def test_ingest_options_reach_the_ingest(api):
    files = sample_files()
    started = start(api, [p for p in files if p.suffix != ".txt"])
    put_all(api, started, files)
    path = f"/v1/styles/{STYLE}/uploads/{started['uploadId']}/complete"
    done = api.call("POST", path, json={"triggerWord": "zq style"}).json()
    assert current_dataset(api.store, STYLE).trigger_word == "zq style" == IngestOptions("zq style").trigger_word
    assert done["report"]["stats"]["filled_captions"] == 8
