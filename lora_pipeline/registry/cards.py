"""A model card per version: what a person (or a model hub) wants to know about one LoRA, as
Markdown built from the registry record alone (pure: the caller stores or prints it).

Family and base model, trigger word, the training parameters, the dataset it learned from, its
sample images, its loss, where it came from (job, request, dataset hash) and where its files are.
Written beside the version's files (``loras/<style>/<style>_v<N>.md``), shown on the
``trained_lora`` materialization and printed by ``lora-pipeline registry card STYLE VERSION|@ALIAS``.
"""

from __future__ import annotations

from lora_pipeline.registry.models import RegistryDocument, Version, from_epoch_ms

_SAMPLE_SETTINGS = ("num_sample_images", "sample_inference_steps")


def model_card(document: RegistryDocument, version: Version) -> str:
    """The card of ``version`` of ``document``'s style, as Markdown."""
    header = version.file.metadata if version.file is not None else {}
    style, name = document.style, version.name
    aliases = [alias for alias, target in sorted(document.aliases.items()) if target == name]
    loss = version.training.get("finalLoss", header.get("lora_pipeline.final_loss"))
    facts = [
        ("status", version.status.value),
        ("aliases", ", ".join(f"@{a}" for a in aliases) or "none"),
        ("family", header.get("lora_pipeline.family", "")),
        ("base model", header.get("lora_pipeline.base_model", "")),
        ("trigger word", header.get("lora_pipeline.trigger_word") or (version.params or {}).get("trigger_word") or ""),
        ("steps", str(version.training.get("steps", header.get("lora_pipeline.steps", "")))),
        ("final loss", f"{float(loss):.4f}" if loss not in (None, "") else ""),
        ("training images", header.get("lora_pipeline.num_train_images", "")),
        ("created", _when(version.created_at)),
        ("completed", _when(version.completed_at)),
    ]
    lines = [f"# {style} {name}", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value or '-'} |" for what, value in facts]
    params = {k: v for k, v in sorted((version.params or {}).items()) if k not in _SAMPLE_SETTINGS}
    if params:
        lines += ["", "## Training parameters", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in params.items()]
    lines += ["", "## Dataset", ""]
    lines.append(
        f"Dataset version `{version.dataset_hash}` of {style}: "
        f"`lora-pipeline dataset show {style} --version {version.dataset_hash[:12]}`."
        if version.dataset_hash
        else "Not recorded (a version imported from the legacy registry)."
    )
    if version.samples:
        lines += ["", "## Samples", ""]
        for sample in version.samples:
            label = f"seed {sample.seed}: {sample.prompt}" if sample.prompt else sample.key
            lines.append(f"![{_cell(label)}]({sample.url})" if sample.url else f"- `{sample.key}`: {label}")
    lines += ["", "## Files", ""]
    for layout, f in sorted(version.files().items()):
        lines.append(
            f"- {layout}: `{f.key}`"
            + (f" ({f.url})" if f.url else "")
            + (f", sha256 `{f.checksum}`" if f.checksum else "")
        )
    lines += ["", "## Lineage", ""]
    lines.append(f"- training job: `{version.id}`" if version.id else "- training job: not recorded")
    if version.request_id:
        lines.append(f"- request: `{version.request_id}`")
    if version.dataset_hash:
        lines.append(
            f"- dataset: `{version.dataset_hash}` (the training_dataset materialization with this data version)"
        )
    return "\n".join(lines) + "\n"


def _when(ms: int | None) -> str:
    return from_epoch_ms(ms).strftime("%Y-%m-%d %H:%M UTC") if ms else ""


def _cell(value: object) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")
