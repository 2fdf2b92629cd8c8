"""RegistryStore: optimistic concurrency, writes only on change, the derived index, reservations."""

import json

import pytest

from lora_pipeline.registry.evidence import JobReport, LegacyRecord, StoredLora, Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.index import StyleSummary
from lora_pipeline.storage.base import PreconditionFailed
from lora_pipeline.storage.keys import INDEX_KEY, registry_key

from lora_pipeline_tests.registry.lora_files import at, lora_bytes

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"


def submit(version="V1", job=f"{JOB}-e2", request="r1"):
    return Submission("s", version, request, job, "ab", {"rank": 4}, at(0))


def test_a_missing_style_reads_as_an_empty_document_without_etag(store):
    doc, etag = RegistryStore(store).read("s")
    assert doc.versions == () and etag is None


def test_apply_writes_a_new_document_and_indexes_it(store):
    result = RegistryStore(store).apply("s", [submit()])
    assert result.changed and [c.kind for c in result.changes] == ["created"]
    stored = json.loads(store.get(registry_key("s")).data)
    assert stored["versions"][0]["id"] == f"{JOB}-e2"
    assert RegistryStore(store).find_style_for_job(JOB) == "s"


def test_apply_does_not_write_when_nothing_changes(store):
    registry = RegistryStore(store)
    registry.apply("s", [submit()])
    etag = store.head(registry_key("s")).etag
    index_etag = store.head(INDEX_KEY).etag
    again = registry.apply("s", [submit()])
    assert not again.changed and again.changes == []
    assert store.head(registry_key("s")).etag == etag
    assert store.head(INDEX_KEY).etag == index_etag


def test_a_repeated_poll_that_only_moves_updated_at_is_not_a_write(store):
    registry = RegistryStore(store)
    registry.apply("s", [submit(), JobReport(JOB, "IN_PROGRESS", None, None, 1, 2, at(1), "poll")])
    etag = store.head(registry_key("s")).etag
    result = registry.apply("s", [JobReport(JOB, "IN_PROGRESS", None, None, 1, 2, at(9), "poll")])
    assert not result.changed
    assert store.head(registry_key("s")).etag == etag


class _RacingStore:
    """Lets another writer slip in a change between our read and our conditional put, once."""

    def __init__(self, inner, intruder):
        self.inner, self.intruder, self.lost = inner, intruder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **kw):
        if key == registry_key("s") and self.intruder is not None:
            intruder, self.intruder = self.intruder, None
            intruder()
        try:
            return self.inner.put(key, data, **kw)
        except PreconditionFailed:
            self.lost += 1
            raise


def test_a_lost_conditional_write_is_re_read_and_re_merged(store):
    RegistryStore(store).apply("s", [submit()])
    racing = _RacingStore(store, lambda: RegistryStore(store).apply("s", [submit("V2", None, "r2")]))
    RegistryStore(racing).apply("s", [JobReport(JOB, "FAILED", None, "oom", 1, 2, at(3), "webhook")])
    doc, _ = RegistryStore(store).read("s")
    assert racing.lost == 1
    assert [(v.name, v.status) for v in doc.versions] == [("V1", VersionStatus.failed), ("V2", VersionStatus.pending)]


def test_reserve_version_takes_the_next_free_number(store):
    registry = RegistryStore(store)
    v1 = _reserve(registry, "s", request_id="a", dataset_hash="aa", params={"rank": 4})
    v2 = _reserve(registry, "s", request_id="b", dataset_hash="bb", params={"rank": 4})
    assert (v1.name, v2.name, v2.status) == ("V1", "V2", VersionStatus.pending)


def test_reserve_version_returns_the_unfinished_version_for_the_same_dataset_and_params(store):
    registry = RegistryStore(store)
    first = _reserve(registry, "s", request_id="a", dataset_hash="aa", params={"rank": 4})
    again = _reserve(registry, "s", request_id="b", dataset_hash="aa", params={"rank": 4})
    assert again.name == first.name
    assert len(registry.read("s")[0].versions) == 1


def test_reserve_version_reuses_a_completed_version_only_when_asked(store):
    registry = RegistryStore(store)
    v1 = _reserve(registry, "s", request_id="a", dataset_hash="aa", params={"rank": 4})
    registry.apply("s", [StoredLora("s", "loras/s/s_v1.safetensors", 1, None, 1, "e", {}, at(2))])
    assert (
        _reserve(registry, "s", request_id="b", dataset_hash="aa", params={"rank": 4}, reuse_completed=True).name
        == v1.name
    )
    assert _reserve(registry, "s", request_id="c", dataset_hash="aa", params={"rank": 4}).name == "V2"


def test_the_same_dataset_and_params_on_another_base_model_is_another_version(store):
    """A version records its base model; a request on another base is another training, and a
    version recorded before the field existed matches any (as before)."""
    registry = RegistryStore(store)
    same = {"request_id": None, "dataset_hash": "aa", "params": {"rank": 4}}
    sd = _reserve(registry, "s", **{**same, "request_id": "a"}, family="sd1", base_model="tiny")
    assert (sd.family.value, sd.base_model.value) == ("sd1", "tiny")
    xl = _reserve(registry, "s", **{**same, "request_id": "b"}, family="sdxl", base_model="tiny-sdxl")
    assert (sd.name, xl.name) == ("V1", "V2")
    assert _reserve(registry, "s", **{**same, "request_id": "c"}, family="sd1", base_model="tiny").name == "V1"
    older = _reserve(registry, "t", **{**same, "request_id": "d"})
    assert _reserve(registry, "t", **{**same, "request_id": "e"}, base_model="tiny-sdxl").name == older.name


def test_reserve_version_skips_numbers_of_files_no_document_mentions(store):
    store.put("loras/s/s_vV7.safetensors", lora_bytes())
    version = _reserve(RegistryStore(store), "s", request_id="a", dataset_hash="aa", params={})
    assert version.name == "V8"


def test_a_legacy_document_in_the_store_is_backed_up_before_its_first_rewrite(local_store):
    legacy = json.dumps({"versions": [{"id": JOB, "name": "V1", "status": "training"}]}).encode()
    local_store.put(registry_key("s"), legacy)
    RegistryStore(local_store).apply("s", [JobReport(JOB, "FAILED", None, "oom", 1, 2, at(3), "webhook")])
    backups = [i.key for i in local_store.list("registry/s/backups/")]
    assert len(backups) == 1 and local_store.get(backups[0]).data == legacy
    assert json.loads(local_store.get(registry_key("s")).data)["schemaVersion"] == 1


def test_the_index_never_goes_back_to_an_older_revision(local_store):
    registry = RegistryStore(local_store)
    old = registry.apply("s", [submit()]).document
    registry.apply("s", [submit("V2", None, "r2")])
    registry.update_index([StyleSummary.of(old)])
    index, _ = registry.read_index()
    assert index.styles["s"].latest_version == "V2"


def test_the_index_lists_unfinished_jobs_for_routing_and_polling(local_store):
    registry = RegistryStore(local_store)
    registry.apply(
        "s",
        [
            submit(),
            LegacyRecord("s", {"id": "0b7c3c1e-9d7a-4f36-9a43-2f6f1d0c8a11", "name": "V2", "status": "completed"}),
        ],
    )
    summary = registry.read_index()[0].styles["s"]
    assert list(summary.unfinished) == [JOB]
    assert summary.unfinished[JOB].job_id == f"{JOB}-e2"
    assert registry.find_style_for_job("0b7c3c1e-9d7a-4f36-9a43-2f6f1d0c8a11-e1") == "s"


def test_styles_lists_every_document(local_store):
    registry = RegistryStore(local_store)
    for style in ("b", "a.1", "c-2"):
        registry.apply(style, [Submission(style, "V1", "r", None, "ab", {}, at(0))])
    assert registry.styles() == ["a.1", "b", "c-2"]


def test_an_unreadable_document_is_refused_with_its_style_named(local_store):
    local_store.put(registry_key("s"), b"{not json")
    with pytest.raises(ValueError, match="'s'"):
        RegistryStore(local_store).read("s")


def _reserve(registry: RegistryStore, style: str, **kwargs):
    """The version claim_version finds or reserves (the claim itself aside)."""
    from datetime import timedelta

    return registry.claim_version(style, owner="test", lease=timedelta(seconds=60), **kwargs).version
