"""``lora-pipeline deploy init|local``: set up a Postgres-backed instance; run it on one machine."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def deploy() -> None:
    """The production shape (docs/deploy.md): Postgres, code server, webserver, daemon."""


@deploy.command()
@click.option(
    "--gpu-pool-limit",
    type=click.IntRange(1, 10_000),
    default=None,
    help="Slots of the runpod_gpu pool (GPU jobs in flight) [default: LORA_GPU_POOL_LIMIT or 2].",
)
def init(gpu_pool_limit: int | None) -> None:
    """Prepare the instance in DAGSTER_HOME before the deployment serves; safe to re-run.

    Creates or upgrades Dagster's schema, sets every pool's limit explicitly, and re-creates
    the style partitions from the configured store (LORA_STORAGE_URL) and the declared styles
    (lora_pipeline/styles/): this is also the command that moves a laptop's work to a new
    (Postgres) instance (docs/deploy.md), and what readies a fresh DAGSTER_HOME for
    `dg launch --partition <style>` (docs/dg.md).
    """
    import dagster as dg

    from lora_pipeline.definitions import defs
    from lora_pipeline.defs.declared_styles import DECLARED_STYLES
    from lora_pipeline.deploy.init import POOLS, init_instance
    from lora_pipeline.settings import get_settings
    from lora_pipeline.storage.factory import open_configured_store

    settings = get_settings()  # checked when the command started (LORA_GPU_POOL_LIMIT: 1 to 10000)
    limits = {pool: gpu_pool_limit or settings.gpu_pool_limit for pool in POOLS}
    with dg.DagsterInstance.get() as instance:
        instance.upgrade()
        declared = (defs.resources or {})[DECLARED_STYLES]
        report = init_instance(instance, open_configured_store(settings), limits, declared)
    for line in report.lines():
        click.echo(line)


@deploy.group()
def local() -> None:
    """`make prod-local`: the four processes on this machine, no containers."""


def _deployment(root: str, pg_port: int, code_port: int, web_port: int, host: str):
    from lora_pipeline.deploy.local import LocalDeployment
    from lora_pipeline.settings import get_settings

    return LocalDeployment(
        Path(root).resolve(),
        pg_port=pg_port,
        code_port=code_port,
        web_port=web_port,
        host=host,
        gpu_pool_limit=get_settings().gpu_pool_limit,
    )


_options = [
    click.option(
        "--root",
        default=".dagster_prod",
        show_default=True,
        help="Postgres data, DAGSTER_HOME, logs and process-group ids.",
    ),
    click.option("--pg-port", default=5433, show_default=True),
    click.option("--code-port", default=4266, show_default=True),
    click.option("--port", "web_port", default=3000, show_default=True),
    click.option("--host", default="127.0.0.1", show_default=True),
]


def _with_options(func):
    for option in reversed(_options):
        func = option(func)
    return func


@local.command()
@_with_options
def up(root, pg_port, code_port, web_port, host) -> None:
    """Start Postgres, run `deploy init`, start the code server, webserver and daemon."""
    from lora_pipeline.deploy.local import DeploymentError

    deployment = _deployment(root, pg_port, code_port, web_port, host)
    try:
        deployment.up()
    except DeploymentError as exc:
        raise click.ClickException(f"{exc}\n(logs: {deployment.root / 'logs'}; stop: make prod-stop)") from None
    click.echo(
        f"Dagster UI on {deployment.url} (Postgres on 127.0.0.1:{pg_port}, code server on :{code_port}); "
        f"logs in {deployment.root / 'logs'}; stop with `make prod-stop`"
    )


@local.command()
@_with_options
def down(root, pg_port, code_port, web_port, host) -> None:
    """Stop the daemon, webserver and code server (each by the process group recorded under --root,
    whatever ports they were started on), then Postgres."""
    from lora_pipeline.deploy.local import DeploymentError

    try:
        report = _deployment(root, pg_port, code_port, web_port, host).down()
    except DeploymentError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report:
        click.echo(line)
