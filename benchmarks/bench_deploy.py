"""Postgres + the queued run coordinator vs SQLite, on this machine, in the same run.

For each instance (deploy/dagster.yaml on a real Postgres; the same file with SQLite storage),
the same processes as `make prod-local` (code server, webserver, daemon) are started, and:

* **runs launched per minute**: N `reconcile_registry` runs (an empty store: the run is
  almost only Dagster's own work) submitted at once through the webserver's GraphQL API, then
  dequeued by the daemon (max_concurrent_runs 10) and run to the end: N / wall time;
* **sensor tick time** with 1,000 styles, each with one unfinished job, and 1,000 style
  partitions: one evaluation of runpod_job_sensor (the backend answers IN_PROGRESS at once),
  runpod_webhook_sensor and style_discovery_sensor against the instance, median of 5;
* **asset page load** for a style with 500 versions: the webserver's GraphQL query for the
  asset with its 500 materializations of that partition (what the asset page's partition
  view asks for), median of 5.

    .venv/bin/python benchmarks/bench_deploy.py [--runs 20] [--styles 1000] [--versions 500]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import dagster as dg
import httpx
from dagster_graphql import DagsterGraphQLClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_pipeline.deploy.local import DEPLOY, LocalDeployment  # noqa: E402

DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
ASSET_QUERY = """query($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) {
  ... on Asset { assetMaterializations(partitions: $p) { runId timestamp partition
    metadataEntries { label __typename } } } } }"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sqlite_yaml(root: Path) -> Path:
    """deploy/dagster.yaml with Dagster's default storage (SQLite files in DAGSTER_HOME)."""
    text = (DEPLOY / "dagster.yaml").read_text()
    start, end = text.index("storage:"), text.index("# Runs wait in a queue")
    path = root / "sqlite-dagster.yaml"
    path.write_text(text[:start] + text[end:])
    return path


def seed_store(store_dir: Path, styles: int) -> list[str]:
    from lora_pipeline.registry.evidence import Submission
    from lora_pipeline.registry_store.documents import RegistryStore
    from lora_pipeline.storage.local import LocalStore

    store, names = LocalStore(store_dir), []
    registry = RegistryStore(store)
    for i in range(styles):
        style = f"style_{i:04d}"
        job = f"{i:08x}-1111-4222-8333-444455556666-u1"
        registry.apply(style, [Submission(style, 1, f"req-{i}", job, "ab" * 32, {"rank": 4}, datetime.now(UTC))])
        names.append(style)
    return names


class InProgress:
    def status(self, job_id):
        from lora_pipeline.contracts.job_status import JobStatus

        return JobStatus(id=job_id, status="IN_PROGRESS")


def tick_times(instance, repeats: int = 5) -> dict[str, float]:
    from lora_pipeline.definitions import defs
    from lora_pipeline.defs.resources import TrainingBackendResource

    out = {}
    with mock.patch.object(TrainingBackendResource, "get_backend", lambda self, store: InProgress()):
        for name in ("runpod_job_sensor", "runpod_webhook_sensor", "style_discovery_sensor"):
            sensor, times = defs.resolve_sensor_def(name), []
            for _ in range(repeats):
                with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as ctx:
                    started = time.perf_counter()
                    sensor(ctx)
                    times.append(time.perf_counter() - started)
            out[name] = statistics.median(times)
    return out


def launch_rate(dep: LocalDeployment, instance, runs: int) -> float:
    client = DagsterGraphQLClient(dep.host, port_number=dep.web_port)
    started = time.perf_counter()
    ids = [
        client.submit_job_execution(
            "reconcile_registry", repository_location_name="lora_pipeline", repository_name="__repository__"
        )
        for _ in range(runs)
    ]
    while not all(instance.get_run_by_id(r).status in DONE for r in ids):
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    failed = [r for r in ids if instance.get_run_by_id(r).status != dg.DagsterRunStatus.SUCCESS]
    if failed:
        raise SystemExit(f"{len(failed)} runs did not succeed, e.g. {failed[0]}")
    return runs / elapsed * 60


def asset_page(dep: LocalDeployment, instance, versions: int, repeats: int = 5) -> float:
    style = "many_versions"
    instance.add_dynamic_partitions("styles", [style])
    for v in range(1, versions + 1):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key="trained_lora",
                partition=style,
                metadata={
                    "version": f"V{v}",
                    "job_id": f"job-{v}",
                    "url": dg.MetadataValue.url(f"https://cdn/x/{v}"),
                    "steps": 30,
                    "final_loss": 0.1,
                    "dataset_hash": "ab" * 32,
                },
            )
        )
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = httpx.post(
            f"{dep.url}/graphql",
            timeout=120,
            json={"query": ASSET_QUERY, "variables": {"key": {"path": ["trained_lora"]}, "p": [style]}},
        ).json()
        times.append(time.perf_counter() - started)
        assert len(answer["data"]["assetOrError"]["assetMaterializations"]) == versions, answer
    return statistics.median(times)


def measure(kind: str, root: Path, store: Path, styles: list[str], args) -> dict[str, float]:
    yaml_path = DEPLOY / "dagster.yaml" if kind == "postgres" else sqlite_yaml(root)
    dep = LocalDeployment(
        root / kind,
        pg_port=free_port(),
        code_port=free_port(),
        web_port=free_port(),
        instance_yaml=yaml_path,
        extra_env={"LORA_STORAGE_URL": str(store)},
    )
    dep.root.mkdir(parents=True)
    env = {k: v for k, v in dep.env().items() if os.environ.get(k) != v}
    with mock.patch.dict(os.environ, env):
        try:
            dep.up()
            with dg.DagsterInstance.get() as instance:
                instance.add_dynamic_partitions("styles", styles)
                # the daemon stops here, so that only the measured ticks run from now on
                figures = {"runs per minute": launch_rate(dep, instance, args.runs)}
                dep.stop("daemon")
                figures.update({f"{k} tick s": v for k, v in tick_times(instance).items()})
                figures["asset page s"] = asset_page(dep, instance, args.versions)
                return figures
        finally:
            dep.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--styles", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        root = Path(tmp)
        store = root / "store"
        styles = seed_store(store, args.styles)
        results = {kind: measure(kind, root, store, styles, args) for kind in ("postgres", "sqlite")}
    print(f"{'':34} {'Postgres':>10} {'SQLite':>10} {'PG/SQLite':>10}")
    for key in results["postgres"]:
        pg, sq = results["postgres"][key], results["sqlite"][key]
        print(f"{key:34} {pg:10.3f} {sq:10.3f} {pg / sq:10.2f}")


if __name__ == "__main__":
    main()
