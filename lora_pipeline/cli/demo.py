"""``lora-pipeline demo``: run the whole chain headless and print the registry document."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option(
    "--style", default="sample_style", show_default=True, help="Style to train (the bundled sample by default)."
)
@click.option(
    "--base-model",
    default="tiny",
    show_default=True,
    help="Base model: one built in code (tiny = SD 1.x, tiny-sdxl, tiny-flux1, tiny-sd3, tiny-z-image, tiny-flux2-klein, tiny-qwen-image), a folder, "
    "store:<prefix> or a hub id.",
)
@click.option(
    "--model-family",
    default="auto",
    show_default=True,
    help="The family the base model must be (sd1, sd2, sdxl, flux1, sd3, flux2-klein, z-image, qwen-image); "
    "another is refused before anything runs.",
)
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds to wait for training.")
def demo(style: str, base_model: str, model_family: str, timeout_s: float) -> None:
    """Materialize the sample dataset, train it, let the sensors notice completion,
    record it in the registry, and print the style's registry document.

    Uses LORA_STORAGE_URL when set (default: the local directory .lora_store) and a
    temporary Dagster instance.
    """
    from lora_pipeline.demo import DemoStepFailed, run_demo

    try:
        result = run_demo(
            style,
            base_model=base_model,
            model_family=model_family,
            timeout_s=timeout_s,
            echo=lambda m: click.echo(m, err=True),
        )
    except DemoStepFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(result.document.to_json().decode())
    click.echo(f"demo finished in {result.seconds:.0f}s: job {result.job_id}", err=True)
