"""The legacy fixture (fixtures/legacy, a copy of ../shared/fixtures/legacy) reaches exactly what
its EXPECTED.md says, whatever the order of import, webhooks and reconciliation, and however
often each step runs."""

import hashlib
import itertools
from pathlib import Path

import pytest

from lora_pipeline.lifecycle.legacy_import import import_legacy
from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry.urls import UrlRank, url_rank
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.webhook.inbox import write_webhook

from lora_pipeline_tests.lifecycle.test_reconcile import CountingStore

FIXTURE = Path(__file__).parent / "fixtures" / "legacy"
ACCELERATED_BASE = "https://loras-prod.s3-accelerate.amazonaws.com"


def step_import(store):
    import_legacy(store, FIXTURE / "style_images")


def step_webhooks(store):
    for body in sorted((FIXTURE / "webhooks").glob("*.json")):
        write_webhook(store, body.read_bytes())
    process_inbox(store)


def step_reconcile(store):
    bucket = FIXTURE / "bucket"
    for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
        store.upload_file(path.relative_to(bucket).as_posix(), path)
    reconcile(store)


STEPS = {"import": step_import, "webhooks": step_webhooks, "reconcile": step_reconcile}
ORDERS = [list(p) for p in itertools.permutations(STEPS)] + [
    ["reconcile", "import", "reconcile", "webhooks", "webhooks", "import", "reconcile"],
    ["webhooks", "webhooks", "reconcile", "import", "import"],
    ["import", "import", "webhooks", "reconcile", "reconcile", "webhooks"],
]


def fixture_digest() -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in FIXTURE.rglob("*")
        if p.is_file()
    }


def assert_expected(store) -> None:
    registry = RegistryStore(store)
    assert registry.styles() == ["style_59", "style_7"]
    s59, _ = registry.read("style_59")
    assert [v.name for v in s59.versions] == ["V1", "V2", "V3", "V4", "V5"]
    assert all(v.status is VersionStatus.completed for v in s59.versions)
    v1, v2, v3, v4, v5 = s59.versions
    assert v1.lora_url == f"{ACCELERATED_BASE}/loras/style_59/style_59_vV1.safetensors"
    assert url_rank(v2.lora_url) >= UrlRank.REGULAR
    assert v3.id == "26945dbf-4e87-4574-ad26-b1f71e865942-e2"
    assert v4.id == "0b7c3c1e-9d7a-4f36-9a43-2f6f1d0c8a11-e1"
    assert v4.lora_url == f"{ACCELERATED_BASE}/loras/style_59/style_59_vV4.safetensors"
    assert v5.s3_key == "loras/style_59/style_59_vV5.safetensors" and v5.id is None
    bases = [base_job_id(j) for v in s59.versions for j in v.job_ids]
    assert len(bases) == len(set(bases))
    assert all(not v.folded_names for v in s59.versions)
    s7, _ = registry.read("style_7")
    assert [(v.name, v.status) for v in s7.versions] == [("V1", VersionStatus.completed), ("V2", VersionStatus.failed)]
    assert s7.versions[0].s3_key == "loras/style_7/style_7_v1.safetensors"
    assert s7.versions[1].error == "CUDA out of memory"


def assert_second_reconciliation_changes_nothing(store) -> None:
    counting = CountingStore(store)
    assert reconcile(counting).changed_versions == 0
    assert counting.writes == []


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_the_legacy_fixture_reaches_expected_in_any_order(order, tmp_path):
    before = fixture_digest()
    store = LocalStore(tmp_path / "store")
    for name in order:
        STEPS[name](store)
    assert_expected(store)
    assert_second_reconciliation_changes_nothing(store)
    assert fixture_digest() == before


@pytest.mark.parametrize("order", [["import", "webhooks", "reconcile"], ["reconcile", "webhooks", "import"]])
def test_the_legacy_fixture_reaches_expected_on_s3(order, s3_store):
    for name in order:
        STEPS[name](s3_store)
    assert_expected(s3_store)
    assert_second_reconciliation_changes_nothing(s3_store)


def test_a_store_publishing_accelerated_urls_upgrades_the_regular_one_and_never_downgrades(tmp_path):
    store = LocalStore(tmp_path / "store", public_base_url=ACCELERATED_BASE)
    for name in ("import", "webhooks", "reconcile"):
        STEPS[name](store)
    s59, _ = RegistryStore(store).read("style_59")
    assert all(url_rank(v.lora_url) is UrlRank.ACCELERATED for v in s59.versions)
    assert s59.version("V2").lora_url == f"{ACCELERATED_BASE}/loras/style_59/style_59_vV2.safetensors"


def test_the_import_reports_what_it_folded(tmp_path):
    report = import_legacy(LocalStore(tmp_path / "store"), FIXTURE / "style_images")
    assert [(f.style, f.version, f.records) for f in report.folded] == [("style_59", "V4", 2)]
    assert report.imported == ["style_59", "style_7"] and report.problems == []
