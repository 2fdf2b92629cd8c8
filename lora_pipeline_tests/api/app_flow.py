"""The whole app flow against a running Dagster: images → dataset → training → signed callback →
@production → download. Shared by the embedded-defaults test and the Postgres-shape test."""

from __future__ import annotations

import io
import time
import zipfile

import httpx

from lora_pipeline.registry.safetensors_header import complete_header, header_length

from .conftest import ADMIN, Api, upload

FLOW_STYLE = "app_flow"
TRAIN_TIMEOUT_S = 480


def wait_for(what: str, check, timeout_s: float, every: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every)


def version_of_run(api: Api, style: str, training: dict) -> str:
    """The version a training trains: in the POST's answer, else from GET …/trainings/{runId}."""
    if training["version"]:
        return training["version"]

    def tagged():
        return api.call("GET", f"/v1/styles/{style}/trainings/{training['runId']}").json()["version"]

    return wait_for("the run's version", tagged, 300)


def images_to_downloadable_lora(api: Api, receiver, dagster_url: str) -> dict:
    """Every step an app takes, each checked; returns the completed version's record."""
    done = upload(api, FLOW_STYLE)
    assert done["state"] == "completed" and done["datasetHash"]

    started = api.call(
        "POST",
        f"/v1/styles/{FLOW_STYLE}/trainings",
        json={"baseModel": "tiny", "params": {"max_train_steps": 8}, "webhook": receiver.url},
    )
    assert started.status_code == 201, started.text
    training = started.json()
    assert training["runId"], training
    # The version, once the run's step has claimed it (the answer has it unless the run was slow to start).
    assert version_of_run(api, FLOW_STYLE, training) == "V1"
    # The run is Dagster's own: the UI lists it, with its partition and the API's tag.
    run = httpx.post(
        f"{dagster_url}/graphql",
        json={
            "query": "query($id: ID!) { runOrError(runId: $id) { ... on Run { jobName tags { key value } } } }",
            "variables": {"id": training["runId"]},
        },
        timeout=30,
    ).json()["data"]["runOrError"]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["jobName"] == "train_lora" and tags["dagster/partition"] == FLOW_STYLE
    assert tags["lora_pipeline/api_training"] == training["trainingId"] and tags["lora_pipeline/version"] == "V1"
    shown = api.call("GET", f"/v1/styles/{FLOW_STYLE}/trainings/{training['runId']}").json()
    assert shown["version"] == "V1" and shown["versionStatus"] in ("pending", "starting", "training", "completed")

    def completed():
        version = api.call("GET", f"/v1/styles/{FLOW_STYLE}/versions/V1").json()
        assert version.get("status") != "failed", version
        return version if version.get("status") == "completed" else None

    version = wait_for("V1 completed", completed, TRAIN_TIMEOUT_S)
    assert set(version["files"]) == {"kohya", "diffusers"}

    [(message_id, event)] = wait_for("the signed callback", lambda: list(receiver.verified), 60, every=0.5)
    assert message_id == f"msg_{training['trainingId']}_completed" and event["type"] == "training.completed"
    assert event["data"]["version"] == "V1" and set(event["data"]["files"]) == {"kohya", "diffusers"}

    promoted = api.call(
        "POST", f"/v1/styles/{FLOW_STYLE}/aliases/production/promote", token=ADMIN, json={"version": "V1"}
    )
    assert promoted.status_code == 200 and promoted.json()["moved"]
    assert api.call("GET", f"/v1/styles/{FLOW_STYLE}/versions/@production").json()["name"] == "V1"
    for layout in ("kohya", "diffusers"):
        link = api.call("GET", f"/v1/styles/{FLOW_STYLE}/versions/@production/download", params={"format": layout})
        assert link.status_code == 200, link.text
        data = httpx.get(link.json()["url"], timeout=60).content
        assert len(data) == link.json()["size"]
        assert complete_header(data, header_length(data), len(data)).layout == layout

    archive = zipfile.ZipFile(io.BytesIO(api.call("GET", f"/v1/styles/{FLOW_STYLE}/datasets/current.zip").content))
    assert len([n for n in archive.namelist() if n.startswith("images/") and not n.endswith(".txt")]) == 8
    return version
