"""The ``lora-pipeline`` command: one group, a module per subcommand group."""

from __future__ import annotations

import click

from lora_pipeline.cli.dataset import dataset
from lora_pipeline.cli.deploy import deploy
from lora_pipeline.cli.demo import demo
from lora_pipeline.cli.registry import registry
from lora_pipeline.cli.webhook import webhook


@click.group()
@click.version_option(package_name="lora_pipeline")
def main() -> None:
    """Manage style LoRAs: datasets, training, the registry and the webhook receiver.

    Storage comes from LORA_STORAGE_URL (default: the local directory .lora_store).
    """


main.add_command(dataset)
main.add_command(demo)
main.add_command(deploy)
main.add_command(registry)
main.add_command(webhook)
