"""The training request and result: the one contract between the training op and the worker.

Validated with pydantic on both sides so a bad request is refused before any GPU
time is spent, with an error that names the field. This module must not import
torch: the Dagster code location imports it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_pipeline.registry.names import validate_style

ModelFamily = Literal["sd1", "sd2", "sdxl", "flux1", "sd3", "z-image", "flux2-klein", "qwen-image"]
# Base models built in code (random weights; tests, the demo, CPU benchmarks): `tiny` is SD 1.x.
TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-flux1", "tiny-sd3", "tiny-z-image", "tiny-flux2-klein", "tiny-qwen-image")
FamilyChoice = Literal["auto", "sd1", "sd2", "sdxl", "flux1", "sd3", "z-image", "flux2-klein", "qwen-image"]
# "auto": bf16 on a GPU that has it, fp16 on an older GPU, fp32 ("no") on the CPU.
MixedPrecision = Literal["no", "fp16", "bf16", "auto"]
Optimizer = Literal["adamw", "adamw_fused", "adamw8bit"]
# The frozen denoiser's big linears stored weight-only quantized (worker/quantize.py): torchao int8 or
# float8, bitsandbytes NF4 (QLoRA); the LoRA itself is never quantized. "auto" (a request's choice,
# never a resolved one): the planner (worker/memory_plan.py) picks from the GPU's memory.
QuantizeBase = Literal["none", "int8", "float8", "nf4"]
QuantizeChoice = Literal["none", "int8", "float8", "nf4", "auto"]


class TrainingParams(BaseModel):
    """Hyperparameters with defaults that suit a style LoRA on SD1.5-class models."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=256, description="LoRA rank (r).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        description="UNet attention projections to adapt.",
    )
    train_text_encoder: bool = Field(False, description="Also adapt the text encoder(s).")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "cosine", "linear", "constant_with_warmup"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_train_steps: int = Field(1000, ge=1, le=1_000_000)
    num_train_epochs: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Train for this many passes over the dataset instead of max_train_steps.",
    )
    train_batch_size: int = Field(1, ge=1, le=256)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    resolution: int = Field(512, ge=8, le=4096)
    enable_bucketing: bool = Field(True, description="Group images into aspect-ratio buckets instead of square crops.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 = off.")
    seed: int = Field(0, ge=0)
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="Recompute each denoiser block in the backward pass; 'auto': when memory needs it."
    )
    quantize_base: QuantizeChoice = Field(
        "none",
        description="Store the frozen denoiser's transformer-block linears quantized: 'int8' or 'float8' "
        "(torchao), 'nf4' (bitsandbytes, QLoRA). The LoRA is trained unquantized; its file is the same. "
        "'auto': the smallest that is needed to fit the GPU's memory (the planner, docs/worker.md).",
    )
    optimizer: Optimizer = "adamw"
    trigger_word: str | None = Field(None, max_length=200)
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints in the store; 0 = never.")
    num_sample_images: int = Field(
        0,
        ge=0,
        le=16,
        description="Sample images rendered with the LoRA (the presets: 2 for 'tiny', 4 for a real base "
        "model). Not part of a version's identity: changing it renders samples for the existing version.",
    )
    sample_inference_steps: int = Field(
        20, ge=1, le=200, description="Inference steps of each sample image (not part of a version's identity)."
    )
    compile: bool = Field(False, description="torch.compile the UNet.")
    timestep_shift: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Flow-matching families: shift of the training timesteps, sigma' = s*sigma / (1 + (s-1)*sigma) "
        "(FlowMatchEulerDiscreteScheduler's static shift); 1 = unshifted, larger trains more at high noise. "
        "None: the base model's own scheduler (the family's reference). Refused for the UNet families.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_export_kohya(cls, data: Any) -> Any:
        """``export_kohya`` is gone: every version gets both files. Requests that still carry
        it (an older orchestrator sends ``false``) validate; the value is ignored."""
        if isinstance(data, dict) and "export_kohya" in data:
            data = {k: v for k, v in data.items() if k != "export_kohya"}
        return data

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


# Settings of the sample images only: two requests that differ in nothing else train the same
# LoRA, so they are the same version (its samples are rendered again, no training).
SAMPLE_SETTINGS = frozenset({"num_sample_images", "sample_inference_steps"})


def version_identity(params: dict[str, Any]) -> dict[str, Any]:
    """The params that make a version what it is: all but ``SAMPLE_SETTINGS``, defaults filled in
    (a record that lists only what it changed is the same training). A record that no longer
    validates is compared as it is."""
    try:
        full = TrainingParams.model_validate(params).model_dump(mode="json")
    except ValueError:
        full = dict(params)
    return {k: v for k, v in full.items() if k not in SAMPLE_SETTINGS}


def sample_key(lora_key: str, index: int, steps: int, trained_steps: int) -> str:
    """Where sample ``index`` of the version whose LoRA is ``lora_key`` is stored: the worker's
    ``<stem>_sample_<i>.png``, or ``<stem>_sample_<i>_<steps>steps.png`` when it is rendered later
    with other inference steps than the training asked for (so no image is overwritten)."""
    stem = lora_key.removesuffix(".safetensors")
    return f"{stem}_sample_{index}{'' if steps == trained_steps else f'_{steps}steps'}.png"


def missing_samples(have: Collection[str], lora_key: str, trained: dict[str, Any], wanted: TrainingParams) -> list[int]:
    """The sample indices ``wanted``'s sample settings ask for that no key in ``have`` holds,
    for a version trained with ``trained`` (its recorded params)."""
    trained_steps = trained.get("sample_inference_steps", TrainingParams.model_fields["sample_inference_steps"].default)
    return [
        i
        for i in range(wanted.num_sample_images)
        if sample_key(lora_key, i, wanted.sample_inference_steps, trained_steps) not in have
    ]


class TrainingRequest(BaseModel):
    """What the training op sends as RunPod's ``input``."""

    model_config = ConfigDict(extra="forbid")

    style: str
    version: str = Field(description="Registry version name this job produces, e.g. 'V5'.")
    dataset_hash: str = Field(pattern=r"^[0-9a-f]{8,128}$")
    base_model: str = Field(
        "tiny",
        description="'tiny', 'tiny-sdxl', 'tiny-flux1', 'tiny-sd3', 'tiny-z-image', 'tiny-flux2-klein', 'tiny-qwen-image' (built in code), a local folder, "
        "'store:<key prefix>' or a hub id.",
    )
    model_family: FamilyChoice = Field(
        "auto",
        description="Expected family of the base model; 'auto' reads it from the model's config.",
    )
    params: TrainingParams = Field(default_factory=TrainingParams)
    storage_url: str | None = Field(
        None,
        description="Object store to read the dataset from and write the LoRA to; "
        "defaults to the worker's LORA_STORAGE_URL.",
    )
    request_id: str = Field(description="Our id for the submission (idempotency, provenance).")

    @field_validator("style")
    @classmethod
    def _style(cls, value: str) -> str:
        return validate_style(value)


class SampleImage(BaseModel):
    """One sample image the worker rendered with the new LoRA: where it is and how to render it again."""

    key: str
    prompt: str | None = None
    seed: int | None = None
    url: str | None = Field(None, description="The store's stable URL of the image (never a presigned one).")


class TrainingResult(BaseModel):
    """What the worker returns as the job's ``output`` on success."""

    style: str
    version: str
    lora_key: str
    dataset_hash: str
    request_id: str | None = Field(
        None,
        description="The request this job ran: lets the registry attach a job whose id it never "
        "learned (an ambiguous /run) to the version that request reserved.",
    )
    steps: int
    final_loss: float | None = None
    duration_s: float
    sample_keys: list[str] = Field(default_factory=list)
    samples: list[SampleImage] = Field(
        default_factory=list, description="The sample images with their prompts and seeds (``sample_keys``, described)."
    )
    kohya_key: str | None = Field(None, description="The kohya-layout file (ComfyUI, A1111/Forge, kohya tools).")
    files: dict[str, str] = Field(
        default_factory=dict, description="layout (kohya, diffusers) → key of the version's file in it."
    )
    metadata: dict[str, str] = Field(default_factory=dict)
