"""``lora-pipeline webhook serve``: run the RunPod webhook receiver on the configured store."""

from __future__ import annotations

import logging

import click

from lora_pipeline.settings import SettingsError, load_settings


@click.group()
def webhook() -> None:
    """The RunPod webhook receiver (POST /webhooks/runpod?token=…, GET /healthz)."""


@webhook.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--insecure-no-token",
    is_flag=True,
    help="Accept webhooks without LORA_WEBHOOK_TOKEN (anyone who can reach the port can write to the inbox).",
)
def serve(host: str, port: int, insecure_no_token: bool) -> None:
    """Store RunPod webhooks in the inbox of LORA_STORAGE_URL.

    RunPod does not sign webhooks: the receiver checks the `token` query
    parameter against LORA_WEBHOOK_TOKEN, so give RunPod the URL with the token
    (LORA_WEBHOOK_URL is completed with it by the training op).
    """
    import uvicorn

    from lora_pipeline.storage.factory import open_configured_store
    from lora_pipeline.webhook.app import create_app

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    token = settings.webhook_token
    if not token and not insecure_no_token:
        raise click.UsageError(
            "LORA_WEBHOOK_TOKEN is not set: set it to a long random secret (for example "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) and give RunPod "
            "the webhook URL with ?token=<it>; or pass --insecure-no-token for a trusted network."
        )
    if token and len(token) < 16:
        click.echo("warning: LORA_WEBHOOK_TOKEN is shorter than 16 characters", err=True)
    store = open_configured_store(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    click.echo(f"webhook receiver on http://{host}:{port}/webhooks/runpod → inbox of {store.describe()}")
    # access_log off: uvicorn would log the query string, and with it the token.
    uvicorn.run(create_app(store, token), host=host, port=port, access_log=False, log_level="info")
