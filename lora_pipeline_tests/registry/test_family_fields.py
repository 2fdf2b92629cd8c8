"""Each registry version records its model family and base model (``family``, ``baseModel``): set
at submit from the request, corrected by the worker's result and by the file's own header, whatever
order the evidence comes in; documents from before the fields still load."""

import itertools
import json

from lora_pipeline.registry.evidence import JobReport, StoredLora, Submission
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import Attested, RegistryDocument

from .lora_files import at

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
KEY = "loras/s/s_v1.safetensors"


def submitted(family=None, base="tiny-sdxl"):
    return Submission("s", "V1", "r1", f"{JOB}-e1", "ab", {"rank": 4}, at(0), family, base)


def finished(family="sdxl", base="tiny-sdxl"):
    metadata = {"lora_pipeline.family": family, "lora_pipeline.base_model": base}
    return JobReport(JOB, "COMPLETED", {"lora_key": KEY, "metadata": metadata}, None, 1, 2, at(3), "webhook")


def found(family="sdxl", base="tiny-sdxl"):
    header = {"lora_pipeline.family": family, "lora_pipeline.base_model": base, "lora_pipeline.dataset_hash": "ab"}
    return StoredLora("s", KEY, 1, None, 10, "e1", header, at(5))


def version_of(evidence):
    (version,) = merge(RegistryDocument("s"), evidence).versions
    return version


def test_a_submission_records_what_the_request_named():
    version = version_of([submitted("flux1", "/models/flux-dev")])
    assert version.family == Attested("flux1", "request")
    assert version.base_model == Attested("/models/flux-dev", "request")
    record = version.to_dict()
    assert (record["family"], record["familyFrom"]) == ("flux1", "request")
    assert (record["baseModel"], record["baseModelFrom"]) == ("/models/flux-dev", "request")


def test_a_hub_id_has_no_family_until_the_worker_says_it():
    assert version_of([submitted(None, "org/model")]).family is None
    version = version_of([submitted(None, "org/model"), finished("flux1", "org/model")])
    assert version.family == Attested("flux1", "worker")


def test_the_file_header_corrects_the_request_and_the_worker_in_any_order():
    evidence = [submitted("sd1", "tiny"), finished("sd2", "tiny"), found("sdxl", "tiny-sdxl")]
    for order in itertools.permutations(evidence):
        version = version_of(list(order))
        assert version.family == Attested("sdxl", "file")
        assert version.base_model == Attested("tiny-sdxl", "file")


def test_the_fields_survive_the_json_round_trip_with_who_said_them():
    doc = merge(RegistryDocument("s"), [submitted("sdxl"), finished()])
    again = RegistryDocument.from_json(doc.to_json(), "s")
    assert again.versions[0].family == Attested("sdxl", "worker")
    # A re-read request-level value still loses to the file: the rank was kept.
    assert merge(again, [found("sd1", "tiny")]).versions[0].family == Attested("sd1", "file")


def test_a_document_from_before_the_fields_loads_and_keeps_its_legacy_keys():
    old = {
        "schemaVersion": 1,
        "style": "s",
        "versions": [{"id": f"{JOB}-e1", "name": "V1", "status": "completed", "loraUrl": "https://x/s_v1.safetensors"}],
    }
    doc = RegistryDocument.from_json(json.dumps(old).encode(), "s")
    (version,) = doc.versions
    assert version.family is None and version.base_model is None
    record = doc.to_dict()["versions"][0]
    assert "family" not in record and "baseModel" not in record
    assert record["loraUrl"] == "https://x/s_v1.safetensors" and record["id"] == f"{JOB}-e1"


def test_a_hand_written_family_without_its_witness_is_the_weakest_word():
    raw = {"schemaVersion": 1, "style": "s", "versions": [{"name": "V1", "status": "pending", "family": "sd3"}]}
    doc = RegistryDocument.from_json(json.dumps(raw).encode(), "s")
    assert doc.versions[0].family == Attested("sd3", "recorded")
    assert merge(doc, [Submission("s", "V1", "r", None, "ab", {}, at(0), "sd1", "tiny")]).versions[0].family == (
        Attested("sd1", "request")
    )
