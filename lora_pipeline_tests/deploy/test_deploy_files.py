"""deploy/ checked offline: the instance files against Dagster's own schemas, the Compose file
(docker-compose where installed, else the Compose Specification's JSON schema kept in
deploy/schemas/), the Kubernetes manifests and the run launcher's Job (rendered by dagster_k8s)
against the Kubernetes API schema (kubernetes-validate, bundled schemas), the Helm values merged
over the chart's defaults against the chart's values.schema.json (copies in deploy/schemas/), and
the pools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.37.0"
SECRET = "lora-pipeline-env"
PG_ENV = {
    "DAGSTER_PG_HOST": "db",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USERNAME": "u",
    "DAGSTER_PG_PASSWORD": "p",
    "DAGSTER_PG_DB": "d",
    "DAGSTER_CODE_SERVER_HOST": "code-server",
    "DAGSTER_CODE_SERVER_PORT": "4266",
}
SECRET_NAMES = {"DAGSTER_PG_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RUNPOD_API_KEY", "LORA_WEBHOOK_TOKEN"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


# -- the instance ------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", ["dagster.yaml", "compose/dagster.yaml"])
def test_instance_files_pass_dagsters_schema(relative, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config, validate_concurrency_config

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    path = DEPLOY / relative
    config, _ = dagster_instance_config(str(path.parent), path.name)
    validate_concurrency_config(config)  # what the instance checks when it starts (granularity, limits)
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert "default_limit" not in config["concurrency"]["pools"]  # dagster#33552: set explicitly
    if "run_launcher" in config:
        from dagster._config import process_config
        from dagster_docker import DockerRunLauncher

        launcher = config["run_launcher"]
        assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
        assert process_config(DockerRunLauncher.config_type(), launcher["config"]).success


def test_compose_instance_is_the_base_instance_plus_the_docker_launcher():
    base, compose = load(DEPLOY / "dagster.yaml"), load(DEPLOY / "compose/dagster.yaml")
    assert "run_launcher" not in base
    assert {k: v for k, v in compose.items() if k != "run_launcher"} == base


# -- what runs need reaches the run containers ---------------------------------------------------
def _run_variables() -> list[str]:
    """The first variable of every setting a Dagster run needs (lora_pipeline.settings: ``runs``)."""
    from lora_pipeline.settings import env_names, run_fields

    return [env_names(field)[0] for field in run_fields()]


def test_compose_runs_get_every_setting_runs_need():
    """DockerRunLauncher copies only the names it lists from the daemon (which must have each one,
    or the launch fails): every run setting is listed, and every process has it."""
    launcher = load(DEPLOY / "compose/dagster.yaml")["run_launcher"]["config"]["env_vars"]
    missing = [name for name in _run_variables() if name not in launcher]
    assert missing == [], f"add to deploy/compose/dagster.yaml's run_launcher env_vars: {missing}"
    daemon = load(COMPOSE)["services"]["daemon"]["environment"]
    assert [name for name in _run_variables() if name not in daemon] == []
    assert not [entry for entry in launcher if "=" in entry]  # names only: values stay in the environment


def test_kubernetes_runs_get_every_setting_runs_need_by_reference():
    """K8sRunLauncher hands each run's Job the secret lora-pipeline-env (a reference); the secret is
    made from lora-pipeline.env.example, which names every run setting."""
    values = load(DEPLOY / "k8s/values.yaml")
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert launcher["envSecrets"] == [{"name": SECRET}] and "envVars" not in launcher
    example = (DEPLOY / "k8s/lora-pipeline.env.example").read_text()
    named = {line.removeprefix("# ").partition("=")[0] for line in example.splitlines() if "=" in line}
    missing = [name for name in _run_variables() if name not in named]
    assert missing == [], f"add to deploy/k8s/lora-pipeline.env.example: {missing}"
    assert "--from-env-file=lora-pipeline.env" in (DEPLOY / "k8s/values.yaml").read_text()


def test_workspace_names_the_code_server(monkeypatch):
    from dagster._config import process_config
    from dagster._core.workspace.config_schema import WORKSPACE_CONFIG_SCHEMA

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    workspace = load(DEPLOY / "workspace.yaml")
    result = process_config(WORKSPACE_CONFIG_SCHEMA, workspace)
    assert result.success, result.errors
    [entry] = result.value["load_from"]
    assert entry["grpc_server"] == {"host": "code-server", "port": 4266, "location_name": "lora_pipeline"}


# -- pools on every GPU path ------------------------------------------------------------------
def test_every_gpu_path_holds_the_pool_and_init_sets_every_pool():
    from lora_pipeline.definitions import defs
    from lora_pipeline.defs.jobs import GPU_POOL
    from lora_pipeline.deploy.init import POOLS

    assert defs.resolve_job_def("train_lora").graph.node_named("submit_lora_training").definition.pool == GPU_POOL
    graph = defs.get_assets_def("trained_lora").node_def  # materialized from the UI: only its GPU step
    assert {node.name: node.definition.pool for node in graph.nodes} == {
        "take_training_request": None,
        "train_on_gpu": GPU_POOL,
        "record_trained_lora": None,
    }
    named = set()
    for job in [
        defs.resolve_implicit_global_asset_job_def(),
        *(defs.resolve_job_def(n) for n in ("train_lora", "complete_training")),
    ]:
        named |= {op.pool for op in job.graph.iterate_op_defs() if op.pool}
    assert named == set(POOLS)  # deploy init sets each explicitly


# -- Compose -------------------------------------------------------------------------------------
COMPOSE = DEPLOY / "compose/docker-compose.yaml"
COMPOSE_ENV = {"DAGSTER_PG_PASSWORD": "x", "AWS_SECRET_ACCESS_KEY": "y", "LORA_WEBHOOK_TOKEN": "z" * 32}


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_is_valid():
    """`docker-compose config -q` where Compose is installed; else the Compose Specification's schema."""
    cli = _compose_cli()
    if cli is not None:
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE), "config", "-q"],
            capture_output=True,
            text=True,
            env={**os.environ, **COMPOSE_ENV},
        )
        assert result.returncode == 0, result.stderr
    schema = json.loads((DEPLOY / "schemas/compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(load(COMPOSE))


def test_compose_stack_has_every_process_wired_to_one_instance():
    compose = load(COMPOSE)
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "init", "code-server", "webserver", "daemon", "webhook"}
    launcher = load(DEPLOY / "compose/dagster.yaml")["run_launcher"]["config"]
    assert compose["networks"][launcher["network"]]["name"] == launcher["network"]
    for name in ("init", "code-server", "webserver", "daemon", "webhook"):
        env = services[name]["environment"]
        assert set(launcher["env_vars"]) <= set(env), name  # what runs get, every process has
        assert services[name]["networks"] == [launcher["network"]]
    assert "DAGSTER_CURRENT_IMAGE" in services["code-server"]["environment"]  # runs use this image
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["daemon"]["volumes"]
    for name in ("webserver", "daemon"):
        assert services[name]["command"][-1] == "/app/deploy/workspace.yaml"
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}
    assert services["init"]["command"] == ["lora-pipeline", "deploy", "init"]
    assert services["init"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # secrets come from the environment / .env, never from the file
    for name in SECRET_NAMES:
        value = services["webserver"]["environment"].get(name)
        assert value is None or value.startswith("${"), name


# -- Kubernetes ----------------------------------------------------------------------------------
def _manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


@pytest.mark.parametrize("name", ["webhook.yaml", "init-job.yaml"])
def test_manifests_pass_the_kubernetes_api_schema(name):
    for doc in _manifests(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        text = json.dumps(doc)
        assert not any(f'"{s}", "value"' in text for s in SECRET_NAMES - {"DAGSTER_PG_PASSWORD"})


def test_run_launcher_job_rendered_by_dagster_k8s_passes_and_carries_secrets_by_reference():
    """The Job K8sRunLauncher creates for a run, from deploy/k8s/values.yaml's launcher settings."""
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
    from kubernetes.client import ApiClient

    values = load(DEPLOY / "k8s/values.yaml")
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    [deployment] = values["dagster-user-deployments"]["deployments"]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    config = DagsterK8sJobConfig(
        job_image=image,
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
        image_pull_policy=launcher["imagePullPolicy"],
        env_secrets=[s["name"] for s in launcher["envSecrets"]],
        service_account_name=values["global"]["serviceAccountName"],
    )
    job = construct_dagster_k8s_job(
        config,
        ["dagster", "api", "execute_run", "{}"],
        "dagster-run-0123456789abcdef",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            {"container_config": launcher["runK8sConfig"]["containerConfig"]}
        ),
        component="run_worker",
    )
    manifest = ApiClient().sanitize_for_serialization(job)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": SECRET}} in container["envFrom"]
    assert not {e["name"] for e in container.get("env", [])} & SECRET_NAMES
    assert container["image"] == image


def test_helm_values_use_one_secret_and_our_code_location():
    values = load(DEPLOY / "k8s/values.yaml")
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "lora_pipeline.definitions"]
    assert (
        deployment["envSecrets"]
        == values["dagsterDaemon"]["envSecrets"]
        == values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
        == [{"name": SECRET}]
    )
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    pools = values["additionalInstanceConfig"]["concurrency"]["pools"]
    assert "default_limit" not in pools
    text = (DEPLOY / "k8s/values.yaml").read_text()
    assert "env:" not in text and "envVars" not in text  # values would be copied into each Job


# -- Helm values against the chart's values.schema.json (deploy/schemas/README.md) ---------------
# The chart's schema and default values.yaml, copied verbatim from dagster master at 437f92d: the
# 1.13.27 tag's copy could not be fetched here (see the README), so this is the closest pair.
HELM_SCHEMA = DEPLOY / "schemas/dagster-helm-437f92d.values.schema.json"
HELM_DEFAULTS = DEPLOY / "schemas/dagster-helm-437f92d.values.yaml"


def helm_merge(defaults: dict, overrides: dict) -> dict:
    """Helm's coalescing of -f values over the chart's values.yaml: maps merge key by key,
    recursively; lists and scalars replace; an explicit null deletes the chart's key."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _without_external_refs(node):
    """Drop every `$ref` that leaves the file (the Kubernetes definitions on
    raw.githubusercontent.com): its target counts as the permissive {}, while the sibling keywords
    and every local #/$defs reference still apply."""
    if isinstance(node, dict):
        return {
            k: _without_external_refs(v) for k, v in node.items() if not (k == "$ref" and not str(v).startswith("#"))
        }
    if isinstance(node, list):
        return [_without_external_refs(v) for v in node]
    return node


@pytest.fixture(scope="module")
def helm_validator() -> jsonschema.Draft202012Validator:
    stubbed = _without_external_refs(json.loads(HELM_SCHEMA.read_text()))
    assert all(ref.startswith("#/$defs/") for ref in _walk_refs(stubbed))  # nothing left to fetch
    jsonschema.Draft202012Validator.check_schema(stubbed)
    return jsonschema.Draft202012Validator(stubbed)


def _walk_refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            yield from _walk_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_refs(v)


def _helm_errors(validator, values: dict) -> list[tuple[str, str]]:
    """(path, message) of every failure, the branches of an anyOf (`X | None` fields) included."""

    def leaves(error):
        return [leaf for sub in error.context for leaf in leaves(sub)] if error.context else [error]

    return [(e.json_path, e.message) for top in validator.iter_errors(values) for e in leaves(top)]


def test_helm_values_pass_the_charts_schema(helm_validator):
    """What `helm install -f deploy/k8s/values.yaml` validates: the chart's defaults with our file
    merged over them. The chart's defaults alone must pass too, or the copy is wrong."""
    defaults = load(HELM_DEFAULTS)
    ours = load(DEPLOY / "k8s/values.yaml")
    assert _helm_errors(helm_validator, defaults) == []
    merged = helm_merge(defaults, ours)
    assert _helm_errors(helm_validator, merged) == []
    # Helm's semantics, as applied: our deployments list replaces the chart's example one, our
    # queue settings merge into the chart's, and the chart's keys we don't set survive.
    assert [d["name"] for d in merged["dagster-user-deployments"]["deployments"]] == ["lora-pipeline"]
    queued = merged["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queued["maxConcurrentRuns"] == 10 and queued["dequeueUseThreads"] is True
    assert merged["runLauncher"]["config"]["k8sRunLauncher"]["loadInclusterConfig"] is True
    assert merged["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert helm_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": None}}) == {"a": {"b": 1}}


def _drop_deployment_port(values: dict) -> None:
    del values["dagster-user-deployments"]["deployments"][0]["port"]


@pytest.mark.parametrize(
    ("patch", "path", "needle"),
    [
        (
            {"dagsterDaemon": {"runCoordinator": {"config": {"queuedRunCoordinator": {"maxConcurentRuns": 10}}}}},
            "$.dagsterDaemon.runCoordinator.config.queuedRunCoordinator",
            "'maxConcurentRuns' was unexpected",
        ),
        (
            {"dagsterDaemon": {"runCoordinator": {"typ": "QueuedRunCoordinator"}}},
            "$.dagsterDaemon.runCoordinator",
            "'typ' was unexpected",
        ),
        ({"dagsterWebserver": {"replicaCount": "2"}}, "$.dagsterWebserver.replicaCount", "not of type 'integer'"),
        ({"runLauncher": {"type": "K8sRunLaucher"}}, "$.runLauncher.type", "is not one of"),
        (
            {"runLauncher": {"config": {"k8sRunLauncher": {"imagePullPolicy": "ifNotPresent"}}}},
            "$.runLauncher.config.k8sRunLauncher.imagePullPolicy",
            "is not one of",
        ),
        # the deployments list replaces the chart's, so our entry alone must carry every required key
        (_drop_deployment_port, "$['dagster-user-deployments'].deployments[0]", "'port' is a required property"),
    ],
    ids=[
        "misspelled-queue-key",
        "misspelled-coordinator-key",
        "replicas-as-string",
        "launcher-typo",
        "pull-policy-case",
        "deployment-without-port",
    ],
)
def test_helm_schema_rejects_a_broken_values_file_naming_the_path(helm_validator, patch, path, needle):
    ours = load(DEPLOY / "k8s/values.yaml")
    if callable(patch):
        patch(ours)
    else:
        ours = helm_merge(ours, patch)
    merged = helm_merge(load(HELM_DEFAULTS), ours)
    errors = _helm_errors(helm_validator, merged)
    assert any(p == path and needle in m for p, m in errors), errors
    assert jsonschema.exceptions.best_match(helm_validator.iter_errors(merged)).json_path == path


def test_docker_image_holds_the_instance_and_the_deploy_lock():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "cp deploy/compose/dagster.yaml" in dockerfile and "ARG LOCK=locks/deploy.txt" in dockerfile
    assert dg.__version__ == "1.13.27"
