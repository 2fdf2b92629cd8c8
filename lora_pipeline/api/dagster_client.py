"""The Dagster instance as the API reaches it: its webserver's GraphQL endpoint.

Trainings go through Dagster, not around it, so each one is a run in the UI, waits for a
slot of the ``runpod_gpu`` pool and claims its version as every other training does. The
few calls the API needs (find the job's repository, add the style's partition, launch, read
a run's status and tags, find a version's active run, terminate) are plain GraphQL over
httpx: dagster-graphql's client lacks the partition and tag queries, and this keeps the API
process free of the Dagster package.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx

from lora_pipeline.contracts.run_tags import PARTITION_TAG, VERSION_TAG
from lora_pipeline.lifecycle.callbacks import RunFacts

TRAIN_JOB = "train_lora"
STYLES_PARTITIONS = "styles"
ACTIVE = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "MANAGED"]

_REPOSITORIES = """
query { repositoriesOrError { __typename
  ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
  ... on PythonError { message } } }
"""
_ADD_PARTITION = """
mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on PythonError { message } ... on UnauthorizedError { message } } }
"""
_LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on PythonError { message } ... on UnauthorizedError { message }
  ... on PipelineNotFoundError { message } ... on InvalidSubsetError { message }
  ... on RunConflict { message } ... on ConflictingExecutionParamsError { message }
  ... on PresetNotFoundError { message } ... on NoModeProvidedError { message } } }
"""
_RUN = """
query($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { runId status tags { key value } }
  ... on PythonError { message } } }
"""
_RUNS = """
query($filter: RunsFilter!) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId status } } ... on PythonError { message } } }
"""
_TERMINATE = """
mutation($id: String!) { terminateRun(runId: $id) { __typename
  ... on TerminateRunFailure { message } ... on PythonError { message }
  ... on UnauthorizedError { message } ... on RunNotFoundError { message } } }
"""


class DagsterError(Exception):
    """Dagster could not be reached or refused the request; the message says which and why."""


class DagsterClient:
    """GraphQL calls to the webserver at ``url`` (LORA_DAGSTER_URL)."""

    def __init__(self, url: str, *, timeout: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            answer = self._http.post("/graphql", json={"query": query, "variables": variables or {}})
        except httpx.HTTPError as exc:
            raise DagsterError(f"Dagster at {self.url} is unreachable: {exc}") from None
        if answer.status_code != 200:
            raise DagsterError(f"Dagster at {self.url} answered HTTP {answer.status_code}: {answer.text[:300]}")
        body = answer.json()
        if body.get("errors"):
            raise DagsterError(f"Dagster refused the query: {body['errors'][0].get('message')}")
        return body["data"]

    @functools.cached_property
    def repository(self) -> dict[str, str]:
        """The repository selector of the code location holding ``train_lora``."""
        found = self._call(_REPOSITORIES)["repositoriesOrError"]
        for node in found.get("nodes", []):
            if any(job["name"] == TRAIN_JOB for job in node["jobs"]):
                return {"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"]}
        raise DagsterError(f"no code location at {self.url} has the job {TRAIN_JOB}: {found.get('message', '')}")

    def launch_training(self, style: str, run_config: dict[str, Any], tags: dict[str, str]) -> str:
        """Add the style's partition (idempotent) and launch ``train_lora`` for it; the run id."""
        added = self._call(_ADD_PARTITION, {"repo": self.repository, "name": STYLES_PARTITIONS, "key": style})
        kind = added["addDynamicPartition"]["__typename"]
        if kind not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
            raise DagsterError(f"adding partition {style!r}: {added['addDynamicPartition'].get('message', kind)}")
        params = {
            "selector": {**self.repository, "jobName": TRAIN_JOB},
            "runConfigData": run_config,
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in {**tags, PARTITION_TAG: style}.items()]},
        }
        result = self._call(_LAUNCH, {"params": params})["launchRun"]
        if result["__typename"] == "LaunchRunSuccess":
            return result["run"]["runId"]
        detail = "; ".join(e["message"] for e in result.get("errors", [])) or result.get("message", "")
        raise DagsterError(f"Dagster did not launch {TRAIN_JOB} ({result['__typename']}): {detail}")

    def run_facts(self, run_id: str) -> RunFacts | None:
        """The run's status and the version its step claimed (None: no such run)."""
        run = self._call(_RUN, {"id": run_id})["runOrError"]
        if run["__typename"] != "Run":
            return None
        tags = {t["key"]: t["value"] for t in run["tags"]}
        error = f"the Dagster run {run_id} ended {run['status']}: see its logs" if run["status"] == "FAILURE" else None
        return RunFacts(run["status"], tags.get(VERSION_TAG), error)

    def active_runs(self, style: str, version: str) -> list[str]:
        """Runs still active that train ``style``'s ``version``."""
        tags = [{"key": PARTITION_TAG, "value": style}, {"key": VERSION_TAG, "value": version}]
        runs = self._call(_RUNS, {"filter": {"tags": tags, "statuses": ACTIVE}})["runsOrError"]
        return [r["runId"] for r in runs.get("results", [])]

    def terminate(self, run_id: str) -> None:
        result = self._call(_TERMINATE, {"id": run_id})["terminateRun"]
        if result["__typename"] != "TerminateRunSuccess":
            raise DagsterError(f"Dagster did not terminate run {run_id}: {result.get('message', result['__typename'])}")
