"""deploy/ checked offline: the instance files against Dagster's own schemas, the Compose file
(docker-compose where installed, else the Compose Specification's JSON schema kept in
deploy/schemas/), the Kubernetes manifests and the run launcher's Job (rendered by dagster_k8s)
against the Kubernetes API schema (kubernetes-validate, bundled schemas), and the pools."""

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
PG_ENV = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USERNAME": "u",
          "DAGSTER_PG_PASSWORD": "p", "DAGSTER_PG_DB": "d",
          "DAGSTER_CODE_SERVER_HOST": "code-server", "DAGSTER_CODE_SERVER_PORT": "4266"}
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
    assert defs.get_assets_def("trained_lora").op.pool == GPU_POOL  # materialized from the UI
    named = set()
    for job in [defs.resolve_implicit_global_asset_job_def(), *(defs.resolve_job_def(n) for n in
                                                                ("train_lora", "complete_training"))]:
        named |= {node.definition.pool for node in job.graph.nodes if node.definition.pool}
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
        result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                                env={**os.environ, **COMPOSE_ENV})
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
        job_image=image, dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance",
        image_pull_policy=launcher["imagePullPolicy"], env_secrets=[s["name"] for s in launcher["envSecrets"]],
        service_account_name=values["global"]["serviceAccountName"],
    )
    job = construct_dagster_k8s_job(
        config, ["dagster", "api", "execute_run", "{}"], "dagster-run-0123456789abcdef",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            {"container_config": launcher["runK8sConfig"]["containerConfig"]}),
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
    assert deployment["envSecrets"] == values["dagsterDaemon"]["envSecrets"] == \
        values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"] == [{"name": SECRET}]
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    pools = values["additionalInstanceConfig"]["concurrency"]["pools"]
    assert "default_limit" not in pools
    text = (DEPLOY / "k8s/values.yaml").read_text()
    assert "env:" not in text and "envVars" not in text  # values would be copied into each Job


def test_docker_image_holds_the_instance_and_the_deploy_extra():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "cp deploy/compose/dagster.yaml" in dockerfile and "ARG EXTRAS=deploy" in dockerfile
    assert dg.__version__ == "1.13.27"
