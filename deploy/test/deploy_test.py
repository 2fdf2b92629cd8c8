"""`make deploy-test`: the Compose stack for real, on a machine with a Docker engine.

Builds the images (locally made bases where no registry is reachable: base-image.sh), brings
deploy/compose/docker-compose.yaml up with the test override (Debian's Postgres, moto's S3, the
local training backend), ingests the bundled sample into the S3 store, runs the three assets
for ``sample_style`` through the webserver's GraphQL API (the UI's "Materialize selected"),
checks that the daemon's DockerRunLauncher ran it in a container of its own and that the
registry holds a completed V1 with both files, and tears the stack down (also on failure;
KEEP=1 leaves it up). Prints each step with its time; exit status 0 only if every check held.

Not in CI (it needs a Docker engine and builds images for minutes); its output from a run is
in docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".deploy_test"
PROJECT = "lora_deploy_test"
IMAGE = "lora-pipeline-dagster:test"
STYLE = "sample_style"
CHAIN = ["training_dataset", "trained_lora", "lora_registry"]
RUN_CONFIG = {"ops": {"trained_lora": {"config": {"params": {"max_train_steps": 4}, "poll_interval_s": 1.0}}}}
STARTED = time.monotonic()


def step(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def sh(*args: str, capture: bool = False, check: bool = True, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=ROOT, text=True, capture_output=capture, env=env, check=False)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout or "")[-2000:] if capture else ""
        raise SystemExit(f"FAILED ({done.returncode}): {' '.join(args)}\n{detail}")
    return done.stdout if capture else ""


def compose_cmd() -> list[str]:
    files = ["-f", "deploy/compose/docker-compose.yaml", "-f", "deploy/test/docker-compose.test.yaml"]
    return ["docker-compose", "-p", PROJECT, *files, "--env-file", str(WORK / ".env")]


def compose(*args: str, capture: bool = False, check: bool = True) -> str:
    return sh(*compose_cmd(), *args, capture=capture, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_instance() -> Path:
    """The production instance file plus the shared job-state volume for each run container."""
    instance = yaml.safe_load((ROOT / "deploy/compose/dagster.yaml").read_text())
    launcher = instance["run_launcher"]["config"]
    assert "LORA_LOCAL_JOBS_DIR" in launcher["env_vars"]  # a run setting: the production list passes it
    launcher["container_kwargs"] = {"volumes": ["lora_pipeline_test_jobs:/jobs"]}
    path = WORK / "dagster.yaml"
    path.write_text(yaml.safe_dump(instance, sort_keys=False))
    return path


def write_env(ui_port: int, webhook_port: int) -> None:
    values = {
        "LORA_DAGSTER_IMAGE": IMAGE,
        "DAGSTER_PG_PASSWORD": secrets.token_hex(12),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(12),
        "LORA_WEBHOOK_TOKEN": secrets.token_hex(12),
        "LORA_GPU_POOL_LIMIT": "1",
        "LORA_UI_PORT": str(ui_port),
        "LORA_WEBHOOK_PORT": str(webhook_port),
        "LORA_TEST_INSTANCE": str(write_instance()),
    }
    (WORK / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def build_images() -> None:
    step("base images (base-image.sh: debootstrap + docker import; kept if present)")
    sh("bash", "deploy/test/base-image.sh", env={**os.environ, "PY": sys.executable})
    step(f"project image {IMAGE} (deploy/Dockerfile, LOCK=locks/cpu.txt, BASE_IMAGE=lora-pipeline-base:bookworm)")
    sh(
        "docker",
        "build",
        "-q",
        "--network",
        "host",
        "-f",
        "deploy/Dockerfile",
        "--build-arg",
        "BASE_IMAGE=lora-pipeline-base:bookworm",
        "--build-arg",
        "LOCK=locks/cpu.txt",
        "-t",
        IMAGE,
        ".",
    )


def graphql(url: str, query: str, **variables) -> dict:
    answer = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
    if "errors" in answer:
        raise SystemExit(f"GraphQL error: {answer['errors']}")
    return answer["data"]


def wait_for_ui(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/server_info", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"the webserver did not answer at {url} within {timeout_s:.0f}s")


def launch_chain(url: str) -> str:
    from dagster_graphql import DagsterGraphQLClient

    import dagster as dg

    client = DagsterGraphQLClient("127.0.0.1", port_number=int(url.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 120
    while True:  # the code server may still be loading the location
        try:
            return client.submit_job_execution(
                "__ASSET_JOB",
                repository_location_name="lora_pipeline",
                repository_name="__repository__",
                run_config=RUN_CONFIG,
                tags={"dagster/partition": STYLE},
                asset_selection=[dg.AssetKey(a) for a in CHAIN],
            )
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then shown
            if time.monotonic() > deadline:
                raise SystemExit(f"could not submit the run: {exc}") from None
            time.sleep(3)


RUN_QUERY = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status
  assetMaterializations { assetKey { path } } } } }"""


def wait_for_run(url: str, run_id: str, timeout_s: float = 1200) -> dict:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        run = graphql(url, RUN_QUERY, id=run_id)["runOrError"]
        if run["status"] != last:
            step(f"run {run_id[:8]}: {run['status']}")
            last = run["status"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(3)
    raise SystemExit(f"run {run_id} not finished after {timeout_s:.0f}s")


def check(condition: bool, text: str) -> None:
    print(f"  {'ok  ' if condition else 'FAIL'} {text}", flush=True)
    if not condition:
        raise SystemExit(f"check failed: {text}")


def run_chain(url: str) -> None:
    step(f"ingest the bundled sample into the S3 store as {STYLE}")
    compose(
        "exec",
        "-T",
        "webserver",
        "lora-pipeline",
        "dataset",
        "add",
        STYLE,
        "/app/lora_pipeline/sample_data/sample_style",
        "--trigger-word",
        "geoshapes style",
    )
    step("lora-pipeline deploy init again: the style's partition from the store")
    compose("run", "--rm", "init")
    step("launch training_dataset, trained_lora, lora_registry for sample_style through GraphQL")
    run_id = launch_chain(url)
    run = wait_for_run(url, run_id)
    materialized = sorted({"/".join(m["assetKey"]["path"]) for m in run["assetMaterializations"]})
    containers = sh(
        "docker",
        "ps",
        "-a",
        "--filter",
        f"label=dagster/run_id={run_id}",
        "--format",
        "{{.Names}} {{.Image}} {{.Status}}",
        capture=True,
    ).strip()
    registry = json.loads(
        compose("exec", "-T", "webserver", "lora-pipeline", "registry", "show", STYLE, "--json", capture=True)
    )
    versions = registry.get("versions", [])
    step("checks")
    if run["status"] != "SUCCESS":
        print(sh("docker", "logs", "--tail", "80", run_id, capture=True, check=False))
    check(run["status"] == "SUCCESS", f"the run succeeded ({run['status']})")
    check(materialized == sorted(CHAIN), f"it materialized {', '.join(materialized)}")
    check(bool(containers) and IMAGE in containers, f"DockerRunLauncher ran it in its own container: {containers}")
    check(
        len(versions) == 1 and versions[0].get("status") == "completed",
        f"the registry (in S3) holds one completed version: {[(v.get('name'), v.get('status')) for v in versions]}",
    )
    files = versions[0].get("files") or {}
    check({"kohya", "diffusers"} <= set(files), f"with both files: {sorted(files)}")
    settle_the_webhook(url)


RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId jobName status } } } }"


def settle_the_webhook(url: str, timeout_s: float = 240) -> None:
    """The local backend also dropped the job's status body in the store's inbox, as RunPod's
    webhook would: the daemon's webhook sensor applies it. Nothing may run twice or fail."""
    step("the job's webhook file, applied by the webhook sensor in the daemon")
    deadline = time.monotonic() + timeout_s
    while True:
        report = compose("run", "--rm", "init", capture=True)
        waiting = int(re.search(r"webhook files waiting in the inbox[^:]*: (\d+)", report).group(1))
        unfinished = int(re.search(r"unfinished jobs[^:]*: (\d+)", report).group(1))
        if (waiting, unfinished) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(10)
    runs = graphql(url, RUNS_QUERY)["runsOrError"]["results"]
    registry = json.loads(
        compose("exec", "-T", "webserver", "lora-pipeline", "registry", "show", STYLE, "--json", capture=True)
    )
    check(
        (waiting, unfinished) == (0, 0),
        f"inbox empty and no unfinished job (waiting {waiting}, unfinished {unfinished})",
    )
    check(
        all(r["status"] == "SUCCESS" for r in runs),
        f"every run succeeded: {sorted((r['jobName'], r['status']) for r in runs)}",
    )
    check(len(registry.get("versions", [])) == 1, "still one version")


def teardown() -> None:
    step("tear down (containers, volumes, the network, run containers)")
    compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
    runs = sh("docker", "ps", "-aq", "--filter", "label=dagster/job_name", capture=True, check=False).split()
    if runs:
        sh("docker", "rm", "-f", *runs, capture=True, check=False)
    sh("docker", "volume", "rm", "-f", "lora_pipeline_test_jobs", capture=True, check=False)


def main() -> int:
    if (
        shutil.which("docker-compose") is None
        or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0
    ):
        print(
            "make deploy-test needs a running Docker engine and docker-compose "
            "(here: dockerd --bridge=none --iptables=false)",
            file=sys.stderr,
        )
        return 2
    WORK.mkdir(exist_ok=True)
    ui_port, webhook_port = free_port(), free_port()
    url = f"http://127.0.0.1:{ui_port}"
    write_env(ui_port, webhook_port)
    build_images()
    teardown()  # a previous run's leftovers
    try:
        step("docker-compose up -d (postgres, minio→moto, minio-init, init, code-server, webserver, daemon, webhook)")
        compose("up", "-d")
        wait_for_ui(url)
        step(f"webserver answers at {url}")
        print(compose("ps", capture=True), flush=True)
        run_chain(url)
        step("deploy-test passed")
        return 0
    except BaseException:
        step("failed: the last log lines of each service")
        print(compose("logs", "--no-color", "--tail", "25", capture=True, check=False), flush=True)
        raise
    finally:
        if os.environ.get("KEEP"):
            step(f"KEEP=1: the stack stays up ({' '.join(compose_cmd())} down -v to stop it)")
        else:
            teardown()


if __name__ == "__main__":
    sys.exit(main())
