"""``lora-pipeline webhook serve|replay``: the RunPod webhook receiver, and replaying bodies by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from lora_pipeline.settings import SettingsError, settings_or_exit


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

    settings = settings_or_exit()  # a bad value: its line on stderr, exit status 2
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


@webhook.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True, path_type=Path))
def replay(files: tuple[Path, ...]) -> None:
    """Write RunPod status bodies from FILES into the inbox of LORA_STORAGE_URL.

    Each file goes through the receiver's own path: checked against the status
    schema, then written once per (job id, status); a body already delivered is
    reported as a duplicate and not written again, so replaying is always safe.
    A body whose earlier copy was rejected (moved to webhooks/rejected/) is not
    a duplicate: a corrected copy lands. A bad file is named with what is wrong
    and the others are still replayed; the exit status is 1 if any file failed.
    """
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.storage.factory import open_configured_store
    from lora_pipeline.webhook.inbox import MAX_BODY_BYTES, InvalidWebhook, write_webhook

    try:
        store = open_configured_store()
    except (SettingsError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None
    failed = 0
    for path in files:
        try:
            with path.open("rb") as handle:
                body = handle.read(MAX_BODY_BYTES + 1)  # enough to know it is over the limit
            if len(body) > MAX_BODY_BYTES:
                raise InvalidWebhook(f"file is over the {MAX_BODY_BYTES}-byte body limit")
            key = write_webhook(store, body)
        except InvalidWebhook as exc:
            failed += 1
            click.echo(f"error: {path}: not replayed: {exc}", err=True)
            continue
        except OSError as exc:
            failed += 1
            click.echo(f"error: {path}: cannot read it: {exc.strerror or exc}", err=True)
            continue
        except StorageError as exc:
            failed += 1
            click.echo(f"error: {path}: not stored (the store failed; replay it again): {exc}", err=True)
            continue
        if key is None:
            click.echo(f"duplicate: {path}: this job and status were already delivered; nothing written")
        else:
            click.echo(f"stored: {path} -> {key}")
    if failed:
        click.echo(f"{failed} of {len(files)} files not replayed", err=True)
        raise SystemExit(1)
