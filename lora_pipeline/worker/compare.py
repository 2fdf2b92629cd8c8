"""Two versions of a style rendered on the same prompts and seeds, side by side in one image.

``render_comparison`` loads the base model the versions were trained on (their header's
``lora_pipeline.base_model``), applies each version's diffusers-layout LoRA in turn, renders
every prompt with the same seed for both, and stores one labelled grid (rows: prompts,
columns: the two versions) at ``comparisons/<style>/<V1>_vs_<V2>.png``. Used by
``lora-pipeline registry compare`` and the ``compare_lora_versions`` job, which import it
lazily: this module imports torch inside functions only.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.contracts.training import TrainingParams, version_identity
from lora_pipeline.registry.layouts import DIFFUSERS
from lora_pipeline.registry.models import Version, VersionStatus
from lora_pipeline.storage import ObjectStore

LABEL_WIDTH = 200  # the prompt column
HEADER_HEIGHT = 24  # the version names
MIN_CELL = 128  # tiny models render 32 px images: scaled up to this to be seen


class ComparisonError(ValueError):
    """A comparison that cannot be rendered: an unknown version, one without a file, …"""


@dataclass(frozen=True)
class Comparison:
    key: str
    url: str
    size: tuple[int, int]
    prompts: tuple[str, ...]
    seed: int
    steps: int
    base_model: str
    versions: tuple[str, str]
    rows: tuple[tuple[str, str, str], ...] = ()  # side_by_side: (what, first, second)


def side_by_side(first: Version, second: Version) -> list[tuple[str, str, str]]:
    """What a person compares beside the images: the dataset, base model, steps, final loss and
    every training parameter (sample settings aside) where the two differ, as (what, first,
    second) rows."""

    def facts(v: Version) -> dict[str, str]:
        header = v.file.metadata if v.file is not None else {}
        loss = v.training.get("finalLoss", header.get("lora_pipeline.final_loss"))
        return {
            "dataset": (v.dataset_hash or "")[:12],
            "base model": " ".join(
                x for x in (header.get("lora_pipeline.family"), header.get("lora_pipeline.base_model")) if x
            ),
            "steps": str(v.training.get("steps", header.get("lora_pipeline.steps", ""))),
            "final loss": f"{float(loss):.4f}" if loss not in (None, "") else "",
        }

    a, b = facts(first), facts(second)
    rows = [(what, a[what], b[what]) for what in a]
    params_a = version_identity(first.params or {})
    params_b = version_identity(second.params or {})
    for name in sorted(set(params_a) | set(params_b)):
        left, right = params_a.get(name), params_b.get(name)
        if left != right:
            rows.append((name, "" if left is None else str(left), "" if right is None else str(right)))
    return rows


def comparison_version(store: ObjectStore, style: str, name: str) -> tuple[Version, str]:
    """The completed version ``name`` (``V3``, or an alias as ``@production``) of ``style`` and the
    key of its diffusers-layout file."""
    from lora_pipeline.registry.models import UnknownVersion
    from lora_pipeline.registry_store.documents import RegistryStore

    document, _ = RegistryStore(store).read(style)
    try:
        version = document.resolve(name)
    except UnknownVersion as exc:
        raise ComparisonError(str(exc)) from None
    if version.status is not VersionStatus.completed:
        raise ComparisonError(f"{style} {version.name} is {version.status.value}, not completed: it has no LoRA")
    found = version.files().get(DIFFUSERS)
    if found is None:
        raise ComparisonError(
            f"{style} {version.name} has no diffusers-layout LoRA file to load (files: {sorted(version.files())})"
        )
    return version, found.key


def render_comparison(
    store: ObjectStore,
    style: str,
    first: str,
    second: str,
    *,
    prompts: Sequence[str] = (),
    seed: int = 0,
    steps: int | None = None,
) -> Comparison:
    """Render both versions on ``prompts`` (default: the first version's sample prompts, else its
    trigger word) with ``seed`` for every prompt, and store the grid."""
    picked = [comparison_version(store, style, name) for name in (first, second)]  # refusals before torch loads
    if picked[0][0].number == picked[1][0].number:
        raise ComparisonError(
            f"{first} and {second} are both {style} {picked[0][0].name}: compare two different versions"
        )

    from lora_pipeline.registry.names import version_name
    from lora_pipeline.storage.keys import comparison_key
    from lora_pipeline.worker.base_model import resolve_base_model
    from lora_pipeline.worker.family import detect_family
    from lora_pipeline.worker.samples import generate_samples
    from lora_pipeline.worker.train import pick_device

    names = (picked[0][0].name, picked[1][0].name)
    with tempfile.TemporaryDirectory(prefix="lora-compare-") as tmp:
        files, headers = [], []
        for version, key in picked:
            path = Path(tmp) / f"{version.name}.safetensors"
            store.download_file(key, path)
            files.append(path)
            headers.append(lora_header(path))
        base_models = {h.get("lora_pipeline.base_model") or "tiny" for h in headers}
        if len(base_models) != 1:
            raise ComparisonError(f"{names[0]} and {names[1]} were trained on different base models: {base_models}")
        base_model = base_models.pop()
        params = trained_params(headers[0], picked[0][0])
        chosen = list(prompts) or _default_prompts(picked[0][0], params, style)
        render = params.model_copy(
            update={"seed": seed, "sample_inference_steps": steps or params.sample_inference_steps}
        )
        model_dir = resolve_base_model(base_model, store)
        family = detect_family(model_dir)
        device = pick_device()
        columns = []
        with quiet_libraries():
            for path in files:
                # The same seed for every prompt (generate_samples adds the index): one image per call.
                columns.append([generate_samples(model_dir, family, path, [p], render, device)[0] for p in chosen])
    png, size = compose_grid(chosen, names, columns)
    key = comparison_key(style, version_name(picked[0][0].number), version_name(picked[1][0].number))
    store.put(key, png, content_type="image/png")
    rows = tuple(side_by_side(picked[0][0], picked[1][0]))
    return Comparison(
        key, store.url(key), size, tuple(chosen), seed, render.sample_inference_steps, base_model, names, rows
    )


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers', transformers' and peft's warnings and notices while rendering (deprecations,
    "no safety checker", unused weights): a dozen lines a person comparing two LoRAs cannot act on."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def compose_grid(
    prompts: Sequence[str], names: Sequence[str], columns: Sequence[Sequence[bytes]]
) -> tuple[bytes, tuple[int, int]]:
    """One PNG: a header row with the version names, then per prompt its label and one image per
    version. Returns the PNG and its (width, height)."""
    from PIL import Image, ImageDraw

    images = [[Image.open(io.BytesIO(png)).convert("RGB") for png in column] for column in columns]
    cell = max(MIN_CELL, *(im.width for column in images for im in column))
    width, height = LABEL_WIDTH + cell * len(images), HEADER_HEIGHT + cell * len(prompts)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(names):
        draw.text((LABEL_WIDTH + col * cell + 4, 6), name, fill="black")
    for row, prompt in enumerate(prompts):
        top = HEADER_HEIGHT + row * cell
        for line_no, line in enumerate(_wrap(prompt, 30)[: cell // 14]):
            draw.text((4, top + 4 + line_no * 14), line, fill="black")
        for col, column in enumerate(images):
            grid.paste(column[row].resize((cell, cell), Image.Resampling.NEAREST), (LABEL_WIDTH + col * cell, top))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue(), (width, height)


def lora_header(path: Path) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a downloaded LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def trained_params(header: dict[str, str], version: Version) -> TrainingParams:
    """The params a version was trained with: its header's, else its record's, else the defaults."""
    raw: Any = header.get("lora_pipeline.params")
    try:
        if raw:
            return TrainingParams.model_validate_json(raw)
        return TrainingParams.model_validate(version.params or {})
    except ValueError:
        return TrainingParams()


def _default_prompts(version: Version, params: TrainingParams, style: str) -> list[str]:
    listed = [s.prompt for s in version.samples if s.prompt]
    return listed or [params.trigger_word or style]


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def comparison_json(result: Comparison) -> dict[str, Any]:
    """What the CLI's ``--json`` and ``python -m lora_pipeline.worker.compare`` print."""
    return {
        "key": result.key,
        "url": result.url,
        "size": list(result.size),
        "versions": list(result.versions),
        "prompts": list(result.prompts),
        "seed": result.seed,
        "steps": result.steps,
        "baseModel": result.base_model,
        "sideBySide": [{"what": what, "first": a, "second": b} for what, a, b in result.rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lora_pipeline.worker.compare --storage-url URL STYLE V1 V2 [--prompt P]… [--seed N]
    [--steps N]``: one JSON object on stdout; a refusal's reason on stderr, exit status 2. The
    Dagster job runs this in a subprocess, so the code location never imports torch."""
    import argparse
    import json
    import sys

    from lora_pipeline.settings import get_settings
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.storage.factory import open_store

    parser = argparse.ArgumentParser(prog="python -m lora_pipeline.worker.compare")
    parser.add_argument("--storage-url", required=True)
    parser.add_argument("style")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        store = open_store(args.storage_url, settings=get_settings())
        result = render_comparison(
            store, args.style, args.first, args.second, prompts=args.prompt, seed=args.seed, steps=args.steps
        )
    except (ComparisonError, StorageError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps(comparison_json(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
