"""``lora-pipeline api serve``: the app's HTTP API (docs/api.md)."""

from __future__ import annotations

import logging
from datetime import timedelta

import click

from lora_pipeline.settings import settings_or_exit


@click.group()
def api() -> None:
    """The app's HTTP API: uploads, trainings, versions, downloads, callbacks (docs/api.md)."""


@api.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
def serve(host: str, port: int) -> None:
    """Serve the API over LORA_STORAGE_URL, launching trainings in the Dagster at LORA_DAGSTER_URL.

    Every route wants `Authorization: Bearer <LORA_API_TOKEN>` (promote, rollback and delete:
    LORA_API_ADMIN_TOKEN's); callbacks are signed with LORA_API_WEBHOOK_SECRET. GET
    /openapi.json describes the routes.
    """
    import uvicorn

    from lora_pipeline.api.app import ApiConfig, create_app
    from lora_pipeline.api.dagster_client import DagsterClient
    from lora_pipeline.storage.factory import open_configured_store

    settings = settings_or_exit()
    if not settings.api_token:
        raise click.UsageError(
            "LORA_API_TOKEN is not set: set it to a long random secret (for example "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`); apps send it as "
            "Authorization: Bearer <it>."
        )
    for name, value in (("LORA_API_TOKEN", settings.api_token), ("LORA_API_ADMIN_TOKEN", settings.api_admin_token)):
        if value and len(value) < 16:
            click.echo(f"warning: {name} is shorter than 16 characters", err=True)
    if settings.api_admin_token == settings.api_token:
        raise click.UsageError("LORA_API_ADMIN_TOKEN must differ from LORA_API_TOKEN")
    store = open_configured_store(settings)
    config = ApiConfig(
        token=settings.api_token,
        admin_token=settings.api_admin_token,
        webhook_secret=settings.api_webhook_secret,
        public_url=settings.api_public_url,
        upload_ttl=timedelta(hours=settings.api_upload_ttl_hours),
        primary=settings.primary_format,
        local_store=settings.local_storage_dir is not None,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    click.echo(f"API on http://{host}:{port} → store {store.describe()}, Dagster {settings.dagster_url}")
    # access_log off: the signed file URLs carry their grant in the path.
    uvicorn.run(create_app(store, DagsterClient(settings.dagster_url), config), host=host, port=port, access_log=False)
