"""The ``lora-pipeline`` command: one group, a module per subcommand group."""

from __future__ import annotations

import click

from lora_pipeline.cli.api import api
from lora_pipeline.cli.dataset import dataset
from lora_pipeline.cli.deploy import deploy
from lora_pipeline.cli.demo import demo
from lora_pipeline.cli.registry import registry
from lora_pipeline.cli.webhook import webhook
from lora_pipeline.settings import settings_or_exit


@click.group()
@click.version_option(package_name="lora_pipeline")
def main() -> None:
    """Manage style LoRAs: datasets, training, the registry and the webhook receiver.

    Storage comes from LORA_STORAGE_URL (default: the local directory .lora_store).
    """
    # Every command starts with valid settings (each reads them with get_settings()): a bad value
    # prints its line on stderr and exits with status 2, no traceback.
    settings_or_exit()


main.add_command(api)
main.add_command(dataset)
main.add_command(demo)
main.add_command(deploy)
main.add_command(registry)
main.add_command(webhook)
