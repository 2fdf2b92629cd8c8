"""The GPU run, in one command: every family, our loop and diffusers' reference, side by side.

On one GPU, under a time budget (default 450 s, so the whole command fits in 8 minutes), it
measures the families of ``bench_families.TABLE`` (one entry each: published configs, the
reference script and its arguments, the tiny model of the dry run, the sizes):

* FLUX.1-dev, SD3.5 medium, FLUX.2 klein 4B, Z-Image and Qwen-Image at 1024², batch 1, LoRA
  rank 16 on ``to_q/k/v/out.0`` on both sides (the reference gets ``--lora_layers``),
  gradient checkpointing on both sides for FLUX.1 and Qwen-Image (and SD3.5 large, last);
  random weights built on the GPU from the configs (``reference_shim/random_weights.py``);
* SD1.5 at 512 px, batch 4, and SDXL at 1024 px, batch 2, rank 16, as before;
* ours (``lora_pipeline.worker.train.train_lora``), and one run per lever with that lever
  alone switched: for the transformers the ``TrainingParams`` levers (``quantize_base`` int8
  for each, float8 and nf4 too for FLUX.1; ``gradient_checkpointing`` flipped;
  ``mixed_precision`` bf16 against fp32 for SD3.5 medium and klein, whose fp32 weights fit),
  read from the installed ``TrainingParams``: a lever it lacks is a row "not available";
  for the UNets the ``SpeedLevers`` (README, "GPU training benchmark");
* the reference: diffusers' scripts at v0.40.0 (``train_dreambooth_lora_{flux,sd3,
  flux2_klein,z_image,qwen_image,sdxl}.py``, ``train_text_to_image_lora.py``), unmodified,
  run through ``runpy``, eager (the UNets' compiled too, by accelerate's own
  ``ACCELERATE_DYNAMO_*`` settings);

each run in its own process (ours' variants of one model share one), warm-up steps
excluded: steady-state steps/s and images/s, peak ``torch.cuda.max_memory_allocated``,
MFU with DESIGN.md's convention (denoiser forward per sample: SD1.5 0.80 TFLOP, SDXL 6.8,
FLUX.1 ≈125, SD3.5 medium ≈23, klein ≈40, Z-Image ≈55, Qwen-Image ≈180 at 1024²: 2 FLOP
per parameter per token plus attention; a LoRA step ≈ 2.1× forward; bf16 dense peak 989
TFLOP/s), and the GPU's ``nvidia-smi`` name. It writes ``gpu_bench.json`` and
``gpu_bench.md`` to ``--out`` after every run, so a run cut short still leaves its figures.
Goals (issue 21): ours at least 2× the reference's steps/s at no more peak memory, and
FLUX.1-dev at 1024² under 24 GB peak (its ``flux1/ours+int8`` run, with the comparison).

Budget (estimates for one H100, no GPU having been lent to measure them): a process
starts in ~10–15 s (imports; the reference's datasets and accelerate ~5 s more); random
weights build on the GPU in ~1 s per 5B parameters plus Python's module construction
(~3–8 s for the largest: Qwen-Image's 20B transformer and 8B Qwen2.5-VL); a step at 1024²
is ≈ 4 × forward FLOPs at ~40% MFU with checkpointing, 3 × without: FLUX.1 ≈1.3 s,
Qwen-Image ≈1.8 s, Z-Image ≈0.4 s, klein ≈0.3 s, SD3.5 medium ≈0.2 s. So 6–8 steps
(2–3 warm-up) time 3–5 steady steps (≥1 s of them) and cost ≤12 s a run:

    comparison        ours (one process)                  reference (one process)   together
    flux1 (+int8)     15 + 2 × (8 + 10) + 5 (int8) = 56     20 + 8 + 10               ≈ 95 s
    sd3-medium        15 + 6 + 3   = 24                        20 + 6 + 3                ≈ 53 s
    flux2-klein       15 + 6 + 3   = 24                        20 + 6 + 3                ≈ 53 s
    z-image           15 + 8 + 4   = 27                        20 + 8 + 4                ≈ 59 s
    qwen-image        15 + 12 + 12 = 39                        20 + 12 + 12              ≈ 83 s

≈ 345 s for the five transformer comparisons, so of the 450 s about 100 s are left for
SD1.5's and SDXL's eager comparisons (≈110 s by the same reckoning): SDXL's reference is the
likely first run the budget skips, then the levers (the transformers' ~15 s each in one
process per family, the UNets', the compiles, SD3.5 large). The budget skips, and says so,
whatever does not fit; ``--only RUN`` (repeatable) measures the rest in a second call.
These are estimates: the first GPU run's ``warmup_s`` and ``wall_s`` columns replace them.

``--dry-run`` runs the same plan on the CPU with the tiny models (``tiny``, ``tiny-sdxl``,
``tiny-flux1``, ``tiny-sd3``, ``tiny-flux2-klein``, ``tiny-z-image``, ``tiny-qwen-image``;
a family whose module or tiny model this checkout lacks is "not available"), the
transformers' from their configs without weights through the same shim, both sides where
the reference scripts are at hand, the compiler's ``eager`` backend and a few steps, and
checks that every package the runs import is on the GPU machine or in the bundle: the GPU
run cannot then fail on a typo. ``make gpu-bundle`` prepares what the GPU machine lacks and
prints the command; ``benchmarks/gpu/run_on_gpu.sh`` is that command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(REPO), str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_families as families  # noqa: E402 - the table: one entry per family
import bench_training as cpu_bench  # noqa: E402 - model specs, dataset writer, reference shims
import bundle  # noqa: E402 - what the GPU machine has, and the reference scripts' flags

MARKER = "BENCH_RESULT "
LORA_STEP_FACTOR = cpu_bench.LORA_STEP_FACTOR
PEAK_TFLOPS = cpu_bench.H100_BF16_TFLOPS
GOAL_SPEEDUP = 2.0
GOAL_MFU = {"sd15": 0.15, "sdxl": 0.25}
COMPILE_MODE = None  # inductor's default: the compile fits the budget; max-autotune is a run of its own
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"
INSTANCE_PROMPT = "a geometric illustration in the geo style"
DEFAULT_REFERENCE_DEPS = bundle.LOCAL_DEPS_DIR


@dataclass(frozen=True)
class Config:
    name: str
    family: str
    resolution: int
    batch_size: int
    rank: int
    reference_script: str  # the file name in the bundle's reference/ folder
    tflop_per_sample: float | None  # denoiser forward, DESIGN.md's convention; None for tiny models
    steps: int
    warmup: int
    images: int  # a multiple of the batch: neither side gets a short batch
    tiny: str = ""  # the tiny model of --dry-run
    reference_args: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()  # TrainingParams fields of our baseline (bench_families)
    peak_goal_gb: float | None = None


@dataclass(frozen=True)
class Scale:
    """What differs between the GPU run and the dry run: sizes and step counts, never code."""

    configs: dict[str, Config]
    log_every: int
    compile_backend: str
    mixed_precision: str
    ragged_images: int  # a dataset whose last batch is short (static-shapes lever)
    max_batch_images: int
    run_timeout_s: float
    compile_timeout_s: float


def _config(entry: families.FamilyEntry, dry_run: bool) -> Config:
    """A family's row of the table at the GPU's sizes, or the dry run's (tiny model, 32 px, rank 4)."""
    sizes: dict[str, Any] = dict(
        resolution=entry.resolution,
        batch_size=entry.batch_size,
        rank=entry.rank,
        tflop_per_sample=entry.tflop_per_sample,
        steps=entry.steps,
        warmup=entry.warmup,
        images=entry.images,
    )
    if dry_run:  # the UNets as before; a transformer step on the CPU is slower: fewer of them
        short = entry.components is not None
        sizes = dict(resolution=32, batch_size=2, rank=4, tflop_per_sample=None, steps=4 if short else 6, warmup=2)
        sizes["images"] = 4
    return Config(
        entry.name,
        entry.family,
        reference_script=Path(entry.reference_script).name,
        tiny=entry.tiny,
        reference_args=entry.reference_args,
        params=tuple(sorted(entry.params.items())),
        peak_goal_gb=None if dry_run else entry.peak_goal_gb,  # tiny models prove nothing about memory
        **sizes,
    )


GPU = Scale(
    # A step is tens of milliseconds (SD1.5) to about two seconds (Qwen-Image): steps and warm-up
    # per family in bench_families.TABLE, sized in the module docstring's arithmetic.
    configs={name: _config(entry, False) for name, entry in families.TABLE.items()},
    log_every=10,
    compile_backend="inductor",
    mixed_precision="bf16",
    ragged_images=10,
    max_batch_images=32,
    run_timeout_s=150,
    compile_timeout_s=240,
)
DRY = Scale(
    configs={name: _config(entry, True) for name, entry in families.TABLE.items()},
    # fp32: bf16 kernels on a CPU without bf16 units are ~20× slower; autocast is one flag either way.
    log_every=2,
    compile_backend="eager",
    mixed_precision="no",
    ragged_images=5,
    max_batch_images=6,
    run_timeout_s=180,
    compile_timeout_s=180,
)
TRANSFORMERS = [name for name, entry in families.TABLE.items() if entry.components is not None]
# TrainingParams fields the plan switches, one at a time: a field this checkout's TrainingParams
# lacks (helper D's quantize_base before its branch lands) makes its runs "not available".
LEVER_FIELDS = ("mixed_precision", "gradient_checkpointing", "quantize_base")
QUANTIZED = {"flux1": ("int8", "float8", "nf4")}  # the others: int8 (weight-only), one run each
NOT_AVAILABLE = "not available"
LAST_FAMILY = "sd3-large"  # SD3.5 medium's architecture, larger: measured when the budget allows


@dataclass
class Run:
    id: str
    config: str
    side: str  # "ours" | "reference"
    levers: dict[str, Any] = field(default_factory=dict)  # ours: SpeedLevers fields (empty: the defaults)
    compile: str = "off"  # reference: off | regional | full (accelerate's dynamo settings)
    compile_mode: str | None = None
    images: int | None = None  # dataset size; None: the config's
    lever: str | None = None  # the lever this run isolates
    baseline: str | None = None  # the run it is compared with
    lever_on: bool = True  # True: this run has the lever on and the baseline off
    metric: str = "steps_per_s"
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # ours: TrainingParams fields over the config's
    unavailable: str | None = None  # set by check_plan: why this run cannot run in this checkout


def transformer_runs(name: str, config: Config, dtype: str) -> tuple[list[Run], list[Run]]:
    """A transformer family's comparison (ours, the reference; FLUX.1's 24 GB run) and its levers."""
    step = dict(log_every=1)  # a step is ~0.2–2 s: one sync a step costs nothing, and warm-up needs no rounding
    base = dict(config.params)
    checkpointing = bool(base.get("gradient_checkpointing"))
    quantized = [
        Run(
            f"{name}/ours+{kind}",
            name,
            "ours",
            step,
            params={"quantize_base": kind},
            lever=f"quantize_base={kind}",
            baseline=f"{name}/ours",
            note=f"frozen base {kind}, LoRA bf16" + (", gradient checkpointing" if checkpointing else ""),
        )
        for kind in QUANTIZED.get(name, ("int8",))
    ]
    comparison = [
        Run(f"{name}/ours", name, "ours", step, note=dtype + (", gradient checkpointing" if checkpointing else "")),
        Run(f"{name}/reference", name, "reference", note=" ".join(config.reference_args)),
    ]
    if config.peak_goal_gb:  # the goal's run (FLUX.1-dev under 24 GB) is part of the comparison, in ours' process
        comparison.insert(1, quantized.pop(0))
    levers = quantized + [
        Run(
            f"{name}/ours{'-' if checkpointing else '+'}gradient_checkpointing",
            name,
            "ours",
            step,
            params={"gradient_checkpointing": not checkpointing},
            lever="gradient_checkpointing",
            baseline=f"{name}/ours",
            lever_on=not checkpointing,
            note="gradient checkpointing " + ("off" if checkpointing else "on"),
        )
    ]
    if name in ("sd3-medium", "flux2-klein"):  # fp32 weights of the larger ones leave no room at 1024²
        levers.append(
            Run(
                f"{name}/ours+fp32",
                name,
                "ours",
                step,
                params={"mixed_precision": "no"},
                lever="mixed_precision bf16",
                baseline=f"{name}/ours",
                lever_on=False,
                note="fp32 weights and compute",
            )
        )
    return comparison, levers


def plan(scale: Scale) -> list[Run]:
    """Every run, most important first: the budget cuts from the end."""
    on = dict(log_every=scale.log_every, device_cache=True, fuse_qkv=True)  # TF32: torch's own settings
    compiled = dict(on, compile="regional", compile_mode=COMPILE_MODE, compile_backend=scale.compile_backend)
    mode = f"mode {COMPILE_MODE or 'default'}"
    runs = [
        # The four eager comparisons.
        Run("sd15/ours", "sd15", "ours", note="default levers"),
        Run(
            "sd15/ours+all",
            "sd15",
            "ours",
            on,
            lever="fuse_qkv",
            baseline="sd15/ours",
            note="all levers, eager (defaults + fused QKV)",
        ),
        Run("sd15/reference", "sd15", "reference"),
        Run("sdxl/ours", "sdxl", "ours", note="default levers"),
        Run(
            "sdxl/ours+all",
            "sdxl",
            "ours",
            on,
            lever="fuse_qkv",
            baseline="sdxl/ours",
            note="all levers, eager (defaults + fused QKV)",
        ),
        Run("sdxl/reference", "sdxl", "reference"),
        # SD1.5 compiled, then each lever alone (one process).
        Run(
            "sd15/ours+compile",
            "sd15",
            "ours",
            compiled,
            lever="compile (regional)",
            baseline="sd15/ours+all",
            note=f"all levers, regional compile, {mode}",
        ),
        Run(
            "sd15/ours+all-log_every",
            "sd15",
            "ours",
            dict(on, log_every=1),
            lever="log_every",
            baseline="sd15/ours+all",
            lever_on=False,
            note="loss .item() every step",
        ),
        Run(
            "sd15/ours+all-device_cache",
            "sd15",
            "ours",
            dict(on, device_cache=False),
            lever="device_cache",
            baseline="sd15/ours+all",
            lever_on=False,
            note="torch.stack + host noise per step",
        ),
        Run("sd15/ours+all+tf32", "sd15", "ours", dict(on, tf32=True), note="TF32 on for fp32 matmuls and convs"),
        Run(
            "sd15/ours+all-tf32",
            "sd15",
            "ours",
            dict(on, tf32=False),
            lever="tf32 off",
            baseline="sd15/ours+all+tf32",
            note="TF32 off for fp32 matmuls and convs",
        ),
        Run(
            "sd15/ours+max_batch",
            "sd15",
            "ours",
            dict(on, max_batch=True, max_batch_cap=scale.max_batch_images),
            images=scale.max_batch_images,
            lever="max_batch",
            baseline="sd15/ours+all",
            metric="images_per_s",
            note="largest batch that fits",
        ),
        # SDXL compiled; the references compiled.
        Run(
            "sdxl/ours+compile",
            "sdxl",
            "ours",
            compiled,
            lever="compile (regional)",
            baseline="sdxl/ours+all",
            note=f"all levers, regional compile, {mode}",
        ),
        # accelerate's regional compilation wraps the UNet's leaf modules too, and diffusers'
        # `if self.conv_norm_out:` then fails (TypeError: GroupNorm does not support len()):
        # the reference compiles whole, as accelerate does by default.
        Run(
            "sd15/reference+compile", "sd15", "reference", compile="full", note="accelerate torch.compile, default mode"
        ),
        Run(
            "sdxl/reference+compile", "sdxl", "reference", compile="full", note="accelerate torch.compile, default mode"
        ),
        # What is left: SDXL levers, whole-UNet compile, static shapes on a short last batch.
        Run(
            "sdxl/ours+all-log_every",
            "sdxl",
            "ours",
            dict(on, log_every=1),
            lever="log_every",
            baseline="sdxl/ours+all",
            lever_on=False,
            note="loss .item() every step",
        ),
        Run(
            "sdxl/ours+all-device_cache",
            "sdxl",
            "ours",
            dict(on, device_cache=False),
            lever="device_cache",
            baseline="sdxl/ours+all",
            lever_on=False,
            note="torch.stack + host noise per step",
        ),
        Run(
            "sd15/ours+compile-autotune",
            "sd15",
            "ours",
            dict(compiled, compile_mode=AUTOTUNE_MODE),
            lever=f"compile {AUTOTUNE_MODE}",
            baseline="sd15/ours+compile",
            note=f"all levers, regional compile, {AUTOTUNE_MODE}",
        ),
        Run(
            "sd15/ours+compile-full",
            "sd15",
            "ours",
            dict(compiled, compile="full"),
            lever="compile full vs regional",
            baseline="sd15/ours+compile",
            note=f"all levers, whole-UNet compile, {mode}",
        ),
        Run(
            "sd15/ours+compile-ragged",
            "sd15",
            "ours",
            compiled,
            images=scale.ragged_images,
            lever="static_shapes",
            baseline="sd15/ours+compile-ragged-dynamic",
            note="short last batch topped up (one shape)",
        ),
        Run(
            "sd15/ours+compile-ragged-dynamic",
            "sd15",
            "ours",
            dict(compiled, static_shapes=False),
            images=scale.ragged_images,
            note="short last batch kept (a second shape)",
        ),
    ]
    # The transformer families' comparisons first (the subject), then SD1.5's and SDXL's,
    # then the transformers' levers, then the UNets' levers and compiles, then SD3.5 large.
    comparisons, levers, last = [], [], []
    for name in TRANSFORMERS:
        first, more = transformer_runs(name, scale.configs[name], scale.mixed_precision)
        if name == LAST_FAMILY:
            last += first + more
        else:
            comparisons += first
            levers += more
    return comparisons + runs[:6] + levers + runs[6:] + last


def check_plan(runs: list[Run], scale: Scale) -> None:
    """Every run's settings, checked before anything is built: a typo fails here, in seconds."""
    import torch

    from lora_pipeline.worker.levers import SpeedLevers, check_compile_mode

    ids = [run.id for run in runs]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"duplicate run ids in the plan: {ids}")
    for run in runs:
        if run.config not in scale.configs or run.side not in ("ours", "reference"):
            raise SystemExit(f"{run.id}: unknown config or side")
        if run.baseline and run.baseline not in ids:
            raise SystemExit(f"{run.id}: baseline {run.baseline} is not in the plan")
        try:
            if run.side == "ours":
                device = torch.device("cpu" if scale is DRY else "cuda")
                levers = SpeedLevers(**run.levers).resolve(device, False)
                if scale.configs[run.config].steps <= _round_up(scale.configs[run.config].warmup, levers.log_every):
                    raise ValueError("too few steps to time after warm-up")
                run.unavailable = check_params(run, scale)
            else:
                if run.compile not in ("off", "regional", "full"):
                    raise ValueError(f"reference compile {run.compile!r}")
                check_compile_mode(run.compile_mode, "inductor")
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"{run.id}: {exc}") from None
        run.unavailable = family_missing(run, scale) or run.unavailable


def training_kwargs(config: Config, mixed_precision: str, params: dict[str, Any]) -> dict[str, Any]:
    """Our run's TrainingParams: the config's sizes, its family's baseline, the run's lever."""
    return (
        dict(
            rank=config.rank,
            resolution=config.resolution,
            train_batch_size=config.batch_size,
            max_train_steps=config.steps,
            learning_rate=1e-4,
            seed=0,
            mixed_precision=mixed_precision,
            enable_bucketing=False,
            lr_scheduler="constant",
        )
        | dict(config.params)
        | params
    )


def check_params(run: Run, scale: Scale) -> str | None:
    """None if this checkout's TrainingParams takes the run's fields; why not, for a lever
    (``LEVER_FIELDS``) it lacks or refuses a value of. Any other field or value is a typo: ValueError."""
    from lora_pipeline.contracts.training import TrainingParams

    config = scale.configs[run.config]
    for key in {**dict(config.params), **run.params}:
        if key not in TrainingParams.model_fields:
            if key in LEVER_FIELDS:
                return f"TrainingParams has no field {key!r} in this checkout (its lever has not landed)"
            raise ValueError(f"TrainingParams has no field {key!r}")
    try:
        TrainingParams(**training_kwargs(config, scale.mixed_precision, run.params))
    except ValueError as exc:
        if set(run.params) & set(LEVER_FIELDS):
            return f"TrainingParams refuses {run.params}: {str(exc).splitlines()[-1].strip()}"
        raise
    return None


def family_missing(run: Run, scale: Scale) -> str | None:
    """Why a family's run cannot run in this checkout (its module or tiny model not merged yet)."""
    from lora_pipeline.contracts.training import TINY_MODELS
    from lora_pipeline.worker.families import FAMILIES

    config = scale.configs[run.config]
    if run.side == "ours" and config.family not in {cls.name for cls in FAMILIES}:
        return f"family {config.family!r} is not in lora_pipeline.worker.families in this checkout"
    if scale is DRY and config.tiny not in TINY_MODELS:
        return f"no tiny model {config.tiny!r} in this checkout"
    return None


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


# --------------------------------------------------------------------------- models and data


def model_folder(config: Config, work: Path, dry_run: bool) -> Path:
    """The model a config trains, random weights throughout (no hub).

    SD1.5/SDXL: saved folders (``bench_training.model_spec``; the tiny models on a dry run).
    The transformer families: configs and tokenizers only, their weights built on the device
    when loaded (``reference_shim/random_weights.py``), from the published configs on the GPU
    and from the tiny model's configs on a dry run, so both take the same loading path."""
    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model, ensure_random_model

    entry = families.TABLE[config.name]
    if entry.components is None:
        if dry_run:
            return ensure_named_tiny_model(config.tiny)
        spec = dataclasses.replace(cpu_bench.model_spec(config.name), save_dtype="bfloat16")
        return ensure_random_model(spec, work / f"model-{config.name}-full")
    if dry_run:
        return families.configs_only(ensure_named_tiny_model(config.tiny), entry, work / f"model-{config.name}-tiny")
    return families.write_real_folder(entry, work / f"model-{config.name}-full")


def write_data(work: Path, config: Config, count: int) -> Path:
    """The bundled sample images at the config's resolution: an imagefolder (metadata.jsonl,
    for ours and train_text_to_image_lora.py) with an images-only ``instance/`` folder
    (train_dreambooth_lora_sdxl.py opens every file it finds)."""
    folder = cpu_bench.write_dataset(work / f"data-{config.name}-{config.resolution}-{count}", config.resolution, count)
    instance = folder / "instance"
    instance.mkdir(exist_ok=True)
    for image in folder.glob("*.png"):
        if not (instance / image.name).exists():
            os.link(image, instance / image.name)
    return folder


def build_models(wanted: dict[str, list[int]], work: Path, dry_run: bool, reference_deps: str | None) -> list[dict]:
    """Model folders and datasets: ``wanted`` maps a config to the dataset sizes its runs use."""
    built = []
    for name, counts in wanted.items():
        config = (DRY if dry_run else GPU).configs[name]
        started = time.perf_counter()
        model = model_folder(config, work, dry_run)
        data = {str(count): str(write_data(work, config, count)) for count in counts}
        built.append(
            {
                "config": name,
                "model": str(model),
                "data": data,
                "build_s": round(time.perf_counter() - started, 1),
                "versions": package_versions(),
                "environment": environment_check(reference_deps),
                "imports": imported_distributions(),
            }
        )
    return built


def child_build(args: argparse.Namespace) -> None:
    for row in build_models(json.loads(args.images), Path(args.work), args.dry_run, args.reference_deps):
        _emit(row)


def environment_check(reference_deps: str | None = None) -> list[str]:
    """Requirements of the carried packages that the installed ones do not meet (warnings: the
    wheels go in with --no-deps, so nothing else checks them on the GPU machine)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    if reference_deps and Path(reference_deps).is_dir() and reference_deps not in sys.path:
        sys.path.append(reference_deps)
    problems = []
    for name in bundle.carried_wheels():
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {requirement}: not installed")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                problems.append(f"{name} needs {requirement}: found {found}")
    return problems


# --------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace) -> None:
    import torch

    from lora_pipeline.contracts.training import TrainingParams
    from lora_pipeline.worker.data import Example, decode_image
    from lora_pipeline.worker.levers import SpeedLevers
    from lora_pipeline.worker.train import train_lora, weight_dtype_for
    from reference_shim import random_weights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for variant in json.loads(args.variants):
        config = (DRY if args.dry_run else GPU).configs[variant["config"]]
        data = Path(variant["data"])
        records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line]
        examples = [
            Example(decode_image((data / r["file_name"]).read_bytes(), r["file_name"]), r["text"], r["file_name"])
            for r in records
        ]
        _reset_device(torch)
        started = time.perf_counter()
        try:
            levers = SpeedLevers(**variant["levers"])
            warmup = _round_up(config.warmup, levers.resolve(device, False).log_every)
            steps = config.steps
            if levers.max_batch:  # the same images at a larger batch: ask for enough to time
                steps = math.ceil(config.steps * levers.max_batch_cap / config.batch_size)
            params = TrainingParams(
                **dict(training_kwargs(config, args.mixed_precision, variant["params"]), max_train_steps=steps)
            )
            # A transformer family's folder has no weights: they are built on the device, in this dtype
            # where the loader names none (reference_shim/random_weights.py).
            random_weights.install(device.type, weight_dtype_for(params.mixed_precision, device))
            stamps: dict[int, float] = {}

            def progress(step: int, total: int, loss: float, warmup: int = warmup, stamps=stamps) -> None:
                if step in (warmup, total):
                    _synchronize(torch)
                    stamps[step] = time.perf_counter()

            outcome = train_lora(
                params, config.family, Path(variant["model"]), examples, progress=progress, levers=levers, device=device
            )
            if warmup not in stamps or outcome.steps not in stamps or outcome.steps <= warmup:
                raise RuntimeError(f"no steady state: {outcome.steps} steps, warm-up {warmup}, stamps {sorted(stamps)}")
            rate = (outcome.steps - warmup) / (stamps[outcome.steps] - stamps[warmup])
            row = {
                "status": "ok",
                "steps_per_s": rate,
                "batch_size": outcome.batch_size,
                "steps": outcome.steps,
                "warmup": warmup,
                "warmup_s": stamps[warmup] - started,
                "levers": outcome.levers,
                "final_loss": outcome.final_loss,
            }
        except Exception as exc:  # noqa: BLE001 - one variant's failure is a row, not the end of the run
            row = {"status": "error", "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"}
        row.update(id=variant["id"], wall_s=time.perf_counter() - started, **_memory(torch), **_device(torch))
        row["imports"] = imported_distributions()
        _emit(row)


def reference_argv(config: Config, script: Path, model: Path, data: Path, out: Path, mixed_precision: str) -> list[str]:
    """The reference's command line: its own defaults except what makes the runs comparable."""
    argv = [
        str(script),
        f"--pretrained_model_name_or_path={model}",
        f"--resolution={config.resolution}",
        "--center_crop",
        f"--train_batch_size={config.batch_size}",
        f"--max_train_steps={config.steps}",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--rank={config.rank}",
        f"--mixed_precision={mixed_precision}",
        "--seed=0",
        f"--output_dir={out}",
        "--checkpointing_steps=100000000",
    ]
    if config.family == "sd1":
        argv += [f"--train_data_dir={data}", "--caption_column=text"]
    else:
        argv += [f"--instance_data_dir={data / 'instance'}", f"--instance_prompt={INSTANCE_PROMPT}"]
    if config.name in TRANSFORMERS:
        # The same LoRA as ours: our target modules (the scripts' defaults differ per family).
        argv.append(f"--lora_layers={','.join(our_target_modules())}")
    return argv + list(config.reference_args)


def our_target_modules() -> list[str]:
    """Our LoRA's target modules: TrainingParams' default."""
    from lora_pipeline.contracts.training import TrainingParams

    return list(TrainingParams().target_modules)


def check_reference_flags(reference_dir: Path) -> None:
    """Every option we pass is one the scripts define (read from their argparse source)."""
    for scale in (GPU, DRY):
        for config in scale.configs.values():
            script = reference_dir / config.reference_script
            argv = reference_argv(config, script, Path("m"), Path("d"), Path("o"), scale.mixed_precision)
            bad = bundle.unknown_flags(script, argv[1:])
            if bad:
                raise SystemExit(f"{script} does not define {bad}: the benchmark's reference_argv needs updating")


def reference_env(compile_choice: str, mode: str | None, backend: str) -> dict[str, str]:
    """accelerate's own switches for torch.compile (the script is not changed)."""
    if compile_choice == "off":
        return {"ACCELERATE_DYNAMO_BACKEND": "no"}
    env = {
        "ACCELERATE_DYNAMO_BACKEND": backend,
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true" if compile_choice == "regional" else "false",
    }
    if mode and backend == "inductor":
        env["ACCELERATE_DYNAMO_MODE"] = mode
    return env


def child_reference(args: argparse.Namespace) -> None:
    """Run diffusers' script unmodified; time its "Steps" bar between the warm-up and the last step."""
    import torch
    import tqdm.auto

    config = _config(args)
    shim = _reference_imports(args.reference_deps)
    script = Path(args.reference_dir) / config.reference_script
    out = Path(tempfile.mkdtemp(prefix="bench-ref-out-"))
    argv = reference_argv(config, script, Path(args.model), Path(args.data), out, args.mixed_precision)
    started = time.perf_counter()
    stamps: dict[int, float] = {}
    count = 0
    original_update = tqdm.auto.tqdm.update

    def timed_update(self, n=1):
        nonlocal count
        result = original_update(self, n)
        if getattr(self, "desc", "") == "Steps":  # the training loop's bar, not loading bars
            count += n
            if count in (config.warmup, config.steps):
                _synchronize(torch)
                stamps[count] = time.perf_counter()
            if count >= config.steps:  # steps timed: the script's saving and final pipeline are not ours to time
                rate = (config.steps - config.warmup) / (stamps[config.steps] - stamps[config.warmup])
                row = {
                    "id": args.run_id,
                    "status": "ok",
                    "steps_per_s": rate,
                    "batch_size": config.batch_size,
                    "steps": config.steps,
                    "warmup": config.warmup,
                    "warmup_s": stamps[config.warmup] - started,
                    "wall_s": time.perf_counter() - started,
                    "argv": argv[1:],
                    "torchvision": shim,
                    "compile": os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no"),
                    **_memory(torch),
                    **_device(torch),
                    "imports": imported_distributions(),
                }
                _emit(row)
                raise StepsTimed
        return result

    tqdm.auto.tqdm.update = timed_update
    from reference_shim import random_weights

    random_weights.install(
        "cuda" if torch.cuda.is_available() else "cpu",
        torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32,
    )
    saved_argv = sys.argv
    cpu_bench._no_tracker()
    sys.argv = argv
    try:
        runpy.run_path(str(script), run_name="__main__")
    except StepsTimed:
        return
    finally:
        tqdm.auto.tqdm.update = original_update
        sys.argv = saved_argv
    raise RuntimeError(f"the reference ended after {count} of {config.steps} steps")


class StepsTimed(BaseException):
    """Raised from the reference's progress bar once its steps are timed: its saving and
    final pipeline are not what is measured. A BaseException, so no ``except Exception``
    in the script stops it."""


def _reference_imports(deps: str | None) -> str:
    """The reference's extra import path, and torchvision or the stand-in where no build matches torch."""
    if deps and Path(deps).is_dir():
        sys.path.append(deps)
    if cpu_bench._imports("torchvision.transforms", sys.path):
        return "installed"
    import diffusers.utils
    import transformers.utils

    transformers.utils.is_torchvision_available()  # decided before the stand-in is on the path
    diffusers.utils.is_torchvision_available()
    sys.path.insert(0, str(cpu_bench.SHIM))
    return "shim"


def _config(args: argparse.Namespace) -> Config:
    return (DRY if args.dry_run else GPU).configs[args.config]


def _emit(row: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def _synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_device(torch) -> None:
    import gc

    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - nothing compiled yet
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(torch) -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "mem_kind": "cuda max allocated"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "mem_kind": "cpu max rss"}


def _device(torch) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name}


def imported_distributions() -> dict[str, list[str]]:
    """The distributions behind every module imported so far, and modules that belong to none."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    dists, orphans = set(), set()
    for name, module in list(sys.modules.items()):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top.startswith("_") or "." in name:
            continue
        where = str(getattr(module, "__file__", "") or "")
        if not where or where.startswith((str(REPO / "lora_pipeline"), str(REPO / "benchmarks"))):
            continue  # built in, or this repository's code (lora_pipeline, the torchvision stand-in)
        if top in owners:
            dists.update(bundle.normalize(d) for d in owners[top])
        else:
            orphans.add(top)
    return {"distributions": sorted(dists), "orphans": sorted(orphans)}


def package_versions() -> dict[str, str | None]:
    import importlib.metadata
    import platform

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "huggingface-hub",
        "safetensors",
        "pyarrow",
        "torchvision",
        "triton",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- parent


@dataclass
class Group:
    side: str
    config: str
    runs: list[Run]
    timeout_s: float


def groups_of(runs: list[Run], scale: Scale, *, merge: bool = False) -> list[Group]:
    """Adjacent runs of our loop on one model share a process; each reference run has its own.

    ``merge`` (the dry run) puts all of our runs in one process: the same code, without
    the GPU run's priority order, and minutes less of imports on a CPU.
    """
    groups: list[Group] = []
    for run in runs:
        timeout = scale.compile_timeout_s if _compiles(run) else scale.run_timeout_s
        candidates = groups if merge else groups[-1:]
        target = next(
            (g for g in candidates if run.side == "ours" and g.side == "ours" and (merge or g.config == run.config)),
            None,
        )
        if target:
            target.runs.append(run)
            target.timeout_s += timeout
        else:
            groups.append(Group(run.side, run.config, [run], timeout))
    return groups


def _compiles(run: Run) -> bool:
    return run.compile != "off" or run.levers.get("compile", "off") != "off"


def run_child(command: list[str], timeout_s: float, log: Path, env: dict[str, str]) -> tuple[list[dict], str]:
    """Run one child; its results as they came, and 'ok', 'timeout' or 'exit N'."""
    lines: list[str] = []
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True
        )
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started (compile workers)
            proc.wait()
            status = "timeout"
        reader.join(timeout=10)
    rows = [json.loads(line[len(MARKER) :]) for line in lines if line.startswith(MARKER)]
    return rows, status


def summarise(row: dict[str, Any], run: Run, config: Config) -> dict[str, Any]:
    row = dict(row, id=run.id, config=run.config, side=run.side, note=run.note, lever=run.lever)
    if row.get("status") == "ok":
        rate = row["steps_per_s"]
        batch = row.get("batch_size") or config.batch_size
        row["images_per_s"] = rate * batch
        if config.tflop_per_sample and row.get("device", "cpu") != "cpu":
            achieved = rate * batch * config.tflop_per_sample * LORA_STEP_FACTOR
            row["tflops"] = achieved
            row["mfu"] = achieved / PEAK_TFLOPS
    return row


class Bench:
    def __init__(self, args: argparse.Namespace, runs: list[Run]):
        self.args = args
        self.runs_by_id = {run.id: run for run in runs}
        self.dry_run = args.dry_run
        self.scale = DRY if args.dry_run else GPU
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.rows: dict[str, dict[str, Any]] = {}
        self.built: dict[str, dict[str, Any]] = {}
        self.build_imports: list[dict[str, Any] | None] = []  # the build imports too (lora_pipeline.dataset)
        self.report: dict[str, Any] = {
            "mode": "dry-run (CPU, tiny models)" if self.dry_run else "gpu",
            "gpu": gpu_name(),
            "budget_s": args.budget_s,
            "configs": {name: dataclasses.asdict(c) for name, c in self.scale.configs.items()},
            "peak_tflops": PEAK_TFLOPS,
            "goals": {"speedup": GOAL_SPEEDUP, "mfu": GOAL_MFU, "peak_memory": "no more than the reference"},
        }
        self.reference_dir = Path(args.reference_dir) if args.reference_dir else None
        self.reference_skip = self._reference_problem()

    def _reference_problem(self) -> str | None:
        if self.reference_dir is None:
            return "no --reference-dir given"
        missing = [
            c.reference_script
            for c in self.scale.configs.values()
            if not (self.reference_dir / c.reference_script).is_file()
        ]
        if missing:
            return (
                f"{self.reference_dir} lacks {', '.join(sorted(set(missing)))}: `make gpu-bundle` copies the "
                "reference scripts there from a local diffusers snapshot"
            )
        return None

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # The GPU machine has no network: nothing may wait on a hub (datasets' imagefolder, telemetry).
        offline = {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **offline)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def base_command(self, child: str, config: str) -> list[str]:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            child,
            "--config",
            config,
            "--mixed-precision",
            self.scale.mixed_precision,
            "--out",
            str(self.out),
        ]
        return command + (["--dry-run"] if self.dry_run else [])

    def build(self, name: str, runs: list[Run]) -> dict[str, Any]:
        """The model and datasets of ``name`` (the dry run builds every config at once)."""
        if name in self.built:
            return self.built[name]
        names = sorted({run.config for run in runs}) if self.dry_run else [name]
        wanted = {
            n: sorted({run.images or self.scale.configs[n].images for run in runs if run.config == n}) for n in names
        }
        log = self.logs / f"build-{'-'.join(names)}.log"
        if self.dry_run:  # tiny models build in seconds: here, not in a process that imports everything again
            rows, status = build_models(wanted, self.work, True, self.args.reference_deps), "ok"
        else:
            command = self.base_command("build", name) + ["--work", str(self.work), "--images", json.dumps(wanted)]
            if self.args.reference_deps:
                command += ["--reference-deps", self.args.reference_deps]
            rows, status = run_child(command, self.remaining(), log, self.env())
        for row in rows:
            self.built[row["config"]] = row
            self.build_imports.append(row.get("imports"))
            self.report.setdefault("versions", row.get("versions"))
            self.report.setdefault("environment_warnings", row.get("environment"))
            self.report.setdefault("build_s", {})[row["config"]] = row.get("build_s")
        for n in names:
            self.built.setdefault(n, {"error": f"build {status}: {_tail(log)}"})
        return self.built[name]

    def run_group(self, group: Group, all_runs: list[Run]) -> None:
        config = self.scale.configs[group.config]
        built = {run.config: self.build(run.config, all_runs) for run in group.runs}
        failed = [run for run in group.runs if "error" in built[run.config]]
        for run in failed:
            self.record(run, {"status": "error", "error": built[run.config]["error"]}, self.scale.configs[run.config])
        group = dataclasses.replace(group, runs=[run for run in group.runs if run not in failed])
        if not group.runs:
            return
        log = self.logs / f"{group.runs[0].id.replace('/', '_')}.log"
        if group.side == "ours":
            variants = [
                {
                    "id": run.id,
                    "config": run.config,
                    "levers": run.levers,
                    "params": run.params,
                    "model": built[run.config]["model"],
                    "data": built[run.config]["data"][str(run.images or self.scale.configs[run.config].images)],
                }
                for run in group.runs
            ]
            command = self.base_command("ours", group.config) + ["--variants", json.dumps(variants)]
            env = self.env()
        else:
            run = group.runs[0]
            command = self.base_command("reference", group.config) + [
                "--model",
                built[run.config]["model"],
                "--data",
                built[run.config]["data"][str(config.images)],
                "--run-id",
                run.id,
                "--reference-dir",
                str(self.reference_dir),
            ]
            if self.args.reference_deps:
                command += ["--reference-deps", self.args.reference_deps]
            env = dict(self.env(), **reference_env(run.compile, run.compile_mode, self.scale.compile_backend))
        timeout = min(group.timeout_s, self.remaining())
        print(f"# {', '.join(r.id for r in group.runs)}: up to {timeout:.0f}s", file=sys.stderr, flush=True)
        rows, status = run_child(command, timeout, log, env)
        by_id = {row.get("id"): row for row in rows}
        for run in group.runs:
            row = by_id.get(run.id)
            if row is None:
                reason = "timeout" if status == "timeout" else "error"
                row = {"status": reason, "error": f"{status} after {timeout:.0f}s budget: {_tail(log)}"}
            self.record(run, row, self.scale.configs[run.config])

    def record(self, run: Run, row: dict[str, Any], config: Config) -> None:
        self.rows[run.id] = summarise(row, run, config)
        shown = {k: self.rows[run.id].get(k) for k in ("id", "status", "steps_per_s", "peak_mem_mb", "mfu")}
        print(json.dumps(shown, default=_round), file=sys.stderr, flush=True)
        self.write()

    def execute(self, runs: list[Run]) -> None:
        for run in runs:
            if run.unavailable:
                self.rows[run.id] = {
                    "id": run.id,
                    "config": run.config,
                    "side": run.side,
                    "note": run.note,
                    "lever": run.lever,
                    "status": NOT_AVAILABLE,
                    "error": run.unavailable,
                }
        runs = [run for run in runs if not run.unavailable]
        for group in groups_of(runs, self.scale, merge=self.dry_run):
            if group.side == "reference" and self.reference_skip:
                for run in group.runs:
                    self.rows[run.id] = {
                        "id": run.id,
                        "config": run.config,
                        "side": run.side,
                        "note": run.note,
                        "status": "skipped",
                        "error": f"reference: {self.reference_skip}",
                    }
                continue
            if self.remaining() < self.args.min_run_s:
                for run in group.runs:
                    self.rows[run.id] = {
                        "id": run.id,
                        "config": run.config,
                        "side": run.side,
                        "note": run.note,
                        "status": "skipped",
                        "error": "time budget spent",
                    }
                continue
            self.run_group(group, runs)
        self.write()

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.report["reference_skipped"] = self.reference_skip
        self.report["runs"] = list(self.rows.values())
        self.report["comparisons"] = comparisons(self.rows, self.scale)
        self.report["levers"] = lever_gains(self.rows, self.runs_by_id)
        self.report["import_check"] = import_check([*self.rows.values(), *({"imports": i} for i in self.build_imports)])
        (self.out / "gpu_bench.json").write_text(json.dumps(self.report, indent=2, default=_round) + "\n")
        (self.out / "gpu_bench.md").write_text(markdown(self.report))


def comparisons(rows: dict[str, dict[str, Any]], scale: Scale) -> list[dict[str, Any]]:
    """Per model: our best against the reference (eager, and its best), with the issue's goals."""
    result = []
    for name, config in scale.configs.items():
        ref = _ok(rows.get(f"{name}/reference"))
        ref_best = max(
            filter(None, [ref, _ok(rows.get(f"{name}/reference+compile"))]),
            key=lambda r: r["steps_per_s"],
            default=None,
        )
        ours = [
            r
            for r in rows.values()
            if r.get("config") == name
            and r.get("side") == "ours"
            and _ok(r)
            and r.get("batch_size") == config.batch_size
            and "ragged" not in r["id"]
        ]
        best = max(ours, key=lambda r: r["steps_per_s"], default=None)
        default = _ok(rows.get(f"{name}/ours"))
        entry: dict[str, Any] = {"config": name, "ours_best": best and best["id"], "reference": ref and ref["id"]}
        if best and ref:
            entry.update(
                speedup=best["steps_per_s"] / ref["steps_per_s"],
                speedup_defaults=default["steps_per_s"] / ref["steps_per_s"] if default else None,
                speedup_vs_best_reference=best["steps_per_s"] / ref_best["steps_per_s"],
                memory_ratio=best["peak_mem_mb"] / ref["peak_mem_mb"],
            )
            entry["meets_speed"] = entry["speedup"] >= GOAL_SPEEDUP
            entry["meets_memory"] = entry["memory_ratio"] <= 1.0
        if best and "mfu" in best:
            entry["mfu"] = best["mfu"]
            entry["meets_mfu"] = best["mfu"] >= GOAL_MFU.get(name, 0)
        lowest = min(ours, key=lambda r: r["peak_mem_mb"], default=None)
        if config.peak_goal_gb and lowest:  # the memory goal (FLUX.1-dev at 1024² under 24 GB)
            entry.update(lowest_peak_run=lowest["id"], lowest_peak_gb=lowest["peak_mem_mb"] / 1024)
            entry["meets_peak_goal"] = entry["lowest_peak_gb"] < config.peak_goal_gb
        result.append(entry)
    return result


def lever_gains(rows: dict[str, dict[str, Any]], runs: dict[str, Run]) -> list[dict[str, Any]]:
    """What each lever gave: its run against its baseline, as a ratio of the run's metric."""
    gains = []
    for run_id, run in runs.items():
        if not run.lever or not run.baseline:
            continue
        this, base = _ok(rows.get(run_id)), _ok(rows.get(run.baseline))
        entry: dict[str, Any] = {
            "lever": run.lever,
            "config": run.config,
            "run": run_id,
            "baseline": run.baseline,
            "metric": run.metric,
        }
        if this and base:
            with_lever, without = (this, base) if run.lever_on else (base, this)
            entry.update(
                gain=with_lever[run.metric] / without[run.metric],
                memory_ratio=with_lever["peak_mem_mb"] / without["peak_mem_mb"],
                with_lever=with_lever[run.metric],
                without=without[run.metric],
            )
        elif (rows.get(run_id) or {}).get("status") == NOT_AVAILABLE:
            entry["not_available"] = rows[run_id]["error"]
        gains.append(entry)
    return gains


# Imported here only because this machine has them; absent on the GPU machine, nothing asks for them.
OPTIONAL_HERE = {
    "boto3": "accelerate imports it for its SageMaker config only when installed",
    "botocore": "boto3",
    "jmespath": "boto3",
    "s3transfer": "boto3",
    "httpx2": "huggingface_hub 2.x here; the GPU machine's hub 1.x uses httpx",
    "httpcore2": "httpx2",
    "brotli": "httpx2",
    "truststore": "httpx2",
    "pytz": "pandas imports it only when installed",
}


def import_check(rows) -> dict[str, Any]:
    """Distributions the runs imported that the GPU machine would not have."""
    available = bundle.available_on_device() | set(OPTIONAL_HERE)
    seen, orphans = set(), set()
    for row in rows:
        imports = row.get("imports") or {}
        seen.update(imports.get("distributions", []))
        orphans.update(imports.get("orphans", []))
    return {"missing_on_device": sorted(seen - available), "imported": sorted(seen), "unowned_modules": sorted(orphans)}


def _ok(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return row if row and row.get("status") == "ok" else None


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else str(value)


def _tail(path: Path, size: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def gpu_name() -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"nvidia_smi": None}
    done = subprocess.run(
        [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return {"nvidia_smi": done.stdout.strip() or done.stderr.strip()}


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{value:.1%}"
    if kind == "x":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    gpu = report["gpu"].get("nvidia_smi") or "no GPU"
    versions = report.get("versions") or {}
    lines = [
        f"# GPU training benchmark ({report['mode']})",
        "",
        f"GPU: {gpu}. Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        f"Elapsed {report['elapsed_s']} s of a {report['budget_s']} s budget; MFU against "
        f"{report['peak_tflops']:.0f} TFLOP/s (DESIGN.md's convention).",
        "",
    ]
    if report.get("reference_skipped"):
        lines += [f"**Reference skipped**: {report['reference_skipped']}.", ""]
    lines += [
        "| run | steps/s | images/s | peak MB | MFU | warm-up s | status | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in report["runs"]:
        status = row.get("status")
        if status != "ok":
            status = f"{status}: {(row.get('error') or '').strip().splitlines()[0][:80] if row.get('error') else ''}"
        lines.append(
            f"| {row['id']} | {_fmt(row.get('steps_per_s'))} | {_fmt(row.get('images_per_s'))} | "
            f"{_fmt(row.get('peak_mem_mb'))} | {_fmt(row.get('mfu'), '%')} | {_fmt(row.get('warmup_s'))} | "
            f"{status} | {row.get('note', '')} |"
        )
    lines += [
        "",
        "| model | ours (best) vs reference | defaults vs reference | vs reference's best | "
        "peak memory vs reference | MFU | goals met |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report["comparisons"]:
        keys = ("meets_speed", "meets_memory", "meets_mfu", "meets_peak_goal")
        met = [k for k in keys if c.get(k)]
        missed = [k for k in keys if c.get(k) is False]
        goals = ", ".join([m.removeprefix("meets_") for m in met] + [f"not {m.removeprefix('meets_')}" for m in missed])
        if c.get("lowest_peak_run"):
            goals += f" (lowest peak {c['lowest_peak_gb']:.1f} GiB: {c['lowest_peak_run']})"
        lines.append(
            f"| {c['config']} ({c.get('ours_best') or '-'}) | {_fmt(c.get('speedup'), 'x')} | "
            f"{_fmt(c.get('speedup_defaults'), 'x')} | {_fmt(c.get('speedup_vs_best_reference'), 'x')} | "
            f"{_fmt(c.get('memory_ratio'), 'x')} | {_fmt(c.get('mfu'), '%')} | {goals or '-'} |"
        )
    lines += [
        "",
        "| lever | model | gain | peak memory | with / without | runs |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for g in report["levers"]:
        lines.append(
            f"| {g['lever']} | {g['config']} | "
            f"{'not available' if g.get('not_available') else _fmt(g.get('gain'), 'x')} ({g['metric']}) | "
            f"{_fmt(g.get('memory_ratio'), 'x')} | {_fmt(g.get('with_lever'))} / {_fmt(g.get('without'))} | "
            f"{g['run']} vs {g['baseline']} |"
        )
    check = report["import_check"]
    lines += ["", f"Import check: missing on the GPU machine: {', '.join(check['missing_on_device']) or 'none'}."]
    if report.get("environment_warnings"):
        lines += ["Carried packages' requirements not met: " + "; ".join(report["environment_warnings"]) + "."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench-out", help="where the JSON and table go")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU, tiny models, few steps")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting runs after this (GPU: 450)")
    parser.add_argument("--min-run-s", type=float, default=20.0, help="don't start a run with less time left")
    parser.add_argument(
        "--reference-dir", default=None, help="folder with the reference scripts (default: .gpu_bundle/reference)"
    )
    parser.add_argument(
        "--reference-deps",
        default=None,
        help="extra import path for the reference (datasets …) "
        f"on this machine (default: {DEFAULT_REFERENCE_DEPS} if present)",
    )
    parser.add_argument("--only", action="append", help="run only these run ids (repeatable)")
    parser.add_argument("--work-dir", help="where models and data are built (default: a temporary folder)")
    parser.add_argument("--child", choices=["build", "ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mixed-precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        {"build": child_build, "ours": child_ours, "reference": child_reference}[args.child](args)
        return 0

    scale = DRY if args.dry_run else GPU
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.dry_run else 450.0  # the dry run: every family on 2 CPU cores, 8–15 min
    if args.reference_dir is None and (bundle.BUNDLE / "reference").is_dir():
        args.reference_dir = str(bundle.BUNDLE / "reference")
    if args.reference_deps is None and DEFAULT_REFERENCE_DEPS.is_dir():
        args.reference_deps = str(DEFAULT_REFERENCE_DEPS)
    runs = plan(scale)
    check_plan(runs, scale)
    if args.only:
        unknown = set(args.only) - {run.id for run in runs}
        if unknown:
            raise SystemExit(f"--only: no such runs {sorted(unknown)}")
        runs = [run for run in runs if run.id in args.only]
    bench = Bench(args, runs)
    if bench.reference_dir and not bench.reference_skip:
        check_reference_flags(bench.reference_dir)
    else:
        print(f"# reference: SKIPPED ({bench.reference_skip})", file=sys.stderr, flush=True)
    bench.execute(runs)
    print(markdown(bench.report))
    print(f"# wrote {bench.out / 'gpu_bench.json'} and {bench.out / 'gpu_bench.md'}", file=sys.stderr)
    failed = [r["id"] for r in bench.rows.values() if r.get("status") in ("error", "timeout")]
    missing = bench.report["import_check"]["missing_on_device"]
    if missing:
        print(
            f"# import check: the GPU machine lacks {missing}: carry them (benchmarks/gpu/bundle.py, locks/gpu-bundle.txt)",
            file=sys.stderr,
        )
    if args.dry_run and (failed or missing):
        print(f"# dry run FAILED: {failed or ''} {missing or ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
