"""``compare_lora_versions``: two versions of a style rendered side by side, a click in the UI.

Config: ``style``, ``versions`` (two names), ``prompts`` (default: the first version's sample
prompts), ``seed``, ``steps``. The rendering loads the base model with torch, so it runs in a
subprocess (``python -m lora_pipeline.worker.compare``, the code ``registry compare`` runs):
the code location never imports the training stack. The run records an AssetObservation of
``trained_lora`` (the style's partition) with the grid inline (a thumbnail, or the public URL)
and a link to the full image.
"""

import json
import subprocess
import sys

import dagster as dg
from pydantic import Field

from lora_pipeline.defs.presentation import url_value
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.lifecycle.samples import image_sources
from lora_pipeline.registry.models import SampleImage

COMPARE_TIMEOUT_S = 3600.0


class CompareConfig(dg.Config):
    style: str = Field(description="The style, e.g. style_59.")
    versions: list[str] = Field(description="The two versions to compare, e.g. [V2, V3].")
    prompts: list[str] = Field(default_factory=list, description="Default: the first version's sample prompts.")
    seed: int = Field(0, ge=0, description="The seed of every image (the same for both versions).")
    steps: int | None = Field(None, ge=1, le=200, description="Inference steps; default: the training's.")


def compare_command(url: str, config: CompareConfig) -> list[str]:
    """The subprocess that renders the comparison and prints it as JSON."""
    first, second = config.versions
    command = [sys.executable, "-m", "lora_pipeline.worker.compare", "--storage-url", url, config.style, first, second]
    for prompt in config.prompts:
        command += ["--prompt", prompt]
    command += ["--seed", str(config.seed)]
    if config.steps is not None:
        command += ["--steps", str(config.steps)]
    return command


@dg.op(tags={"kind": "pytorch"})
def render_lora_comparison(context: dg.OpExecutionContext, config: CompareConfig, storage: StorageResource) -> None:
    """Render both versions on the same prompts and seed into one image in the store."""
    if len(config.versions) != 2:
        raise dg.Failure(description=f"versions: name exactly two (got {config.versions})")
    done = subprocess.run(
        compare_command(storage.resolved_url(), config),
        capture_output=True,
        text=True,
        timeout=COMPARE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise dg.Failure(description=f"comparison refused: {reason}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    store = storage.get_store()
    [source] = image_sources(store, [SampleImage(result["key"], url=result["url"])], budget=2**20)
    picture = f"![{' vs '.join(result['versions'])}]({source})\n\n" if source else ""
    prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(result["prompts"]))
    metadata = {
        "comparison": dg.MetadataValue.md(
            f"{picture}Rows: prompts; columns: {' | '.join(result['versions'])}; seed {result['seed']}, "
            f"{result['steps']} steps, base model `{result['baseModel']}`.\n\n{prompts}"
        ),
        "key": result["key"],
        "url": url_value(result["url"]),
        "versions": " vs ".join(result["versions"]),
        "seed": result["seed"],
    }
    context.log_event(
        dg.AssetObservation(asset_key=dg.AssetKey("trained_lora"), partition=config.style, metadata=metadata)
    )
    context.add_output_metadata(metadata)
    context.log.info(f"{config.style} {' vs '.join(result['versions'])}: {result['key']}")


@dg.job(tags={"lora_pipeline/kind": "registry"})
def compare_lora_versions() -> None:
    """Render two versions of a style on the same prompts and seed, side by side."""
    render_lora_comparison()
