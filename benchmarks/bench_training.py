"""Training throughput: our worker's loop next to diffusers' own LoRA script, same model and data.

For each configuration it builds a base model with real architecture sizes and
random weights (SD1.5 at 512 px, SDXL at 1024 px; ``tiny`` for the CPU), writes
the same small dataset for both sides, and runs, each in a fresh subprocess so
peak memory is its own:

* ours: ``lora_pipeline.worker.train.train_lora`` (cached latents and text
  embeddings, SDPA, channels-last, fused AdamW on CUDA);
* reference: diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
  (``train_text_to_image_lora_sdxl.py`` for SDXL), unmodified, run through
  ``runpy`` with its progress bar timed.

It prints steps/s, images/s, peak memory (CUDA: max allocated; CPU: max RSS),
the wall time of the whole run including set-up, and on a GPU the model FLOP
utilisation with DESIGN.md's convention (UNet forward per sample: SD1.5 at 64×64
latents 0.80 TFLOP, SDXL at 128×128 6.8 TFLOP; a LoRA step ≈ 2.1× forward; peak
``--peak-tflops``, default H100 SXM bf16 dense 989).

The reference scripts are not part of this repository. Get them at run time:

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers-ref
    pip install --target /tmp/bench_ref_deps --no-deps torchvision datasets dill multiprocess pandas pyarrow xxhash

    python benchmarks/bench_training.py --tiny \\
        --reference-dir /tmp/diffusers-ref/examples/text_to_image --reference-deps /tmp/bench_ref_deps
    python benchmarks/bench_training.py --config sd15 --config sdxl --mixed-precision bf16 ...   # on a GPU

Without ``--reference-dir`` only our side runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "reference_shim"  # torchvision.transforms stand-in
sys.path.insert(0, str(REPO))

H100_BF16_TFLOPS = 989.0
LORA_STEP_FACTOR = 2.1

CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
OPENCLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)


@dataclass(frozen=True)
class BenchConfig:
    name: str
    resolution: int
    batch_size: int
    rank: int
    tflop_per_sample: float | None  # UNet forward, DESIGN.md's convention
    reference_script: str


CONFIGS = {
    "tiny": BenchConfig("tiny", 64, 2, 4, None, "train_text_to_image_lora.py"),
    "sd15": BenchConfig("sd15", 512, 4, 16, 0.80, "train_text_to_image_lora.py"),
    "sdxl": BenchConfig("sdxl", 1024, 2, 16, 6.8, "train_text_to_image_lora_sdxl.py"),
}


def model_spec(name: str):
    from lora_pipeline.worker.tiny_model import TINY_SD1, RandomModelSpec

    if name == "tiny":
        return TINY_SD1
    if name == "sd15":
        return RandomModelSpec(
            family="sd1",
            unet=dict(
                sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
            ),
            vae=dict(SD_VAE, sample_size=512),
            text_encoder=CLIP_L,
        )
    if name == "sdxl":
        return RandomModelSpec(
            family="sdxl",
            unet=dict(
                sample_size=128,
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                use_linear_projection=True,
            ),
            vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
            text_encoder=CLIP_L,
            text_encoder_2=OPENCLIP_BIGG,
        )
    raise SystemExit(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")


def write_dataset(folder: Path, resolution: int, count: int) -> Path:
    """The bundled sample images, upscaled to the resolution, as an imagefolder (metadata.jsonl)."""
    from PIL import Image

    from lora_pipeline.dataset.ingest import sample_dataset_path

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in sample_dataset_path().iterdir() if p.suffix in (".png", ".jpg"))
    lines = []
    for index in range(count):
        src = sources[index % len(sources)]
        name = f"img_{index:03d}.png"
        Image.open(src).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": src.with_suffix(".txt").read_text().strip()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def peak_memory_mb() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu max rss"


def steady_rate(stamps: list[float], warmup: int) -> float:
    """Steps per second after the first ``warmup`` steps (compile, allocator, caches)."""
    if len(stamps) <= warmup + 1:
        raise SystemExit(f"need more than {warmup + 1} steps to time, got {len(stamps)}")
    timed = stamps[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


# --------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lora_pipeline.contracts.training import TrainingParams
    from lora_pipeline.worker.data import Example, decode_image
    from lora_pipeline.worker.family import detect_family
    from lora_pipeline.worker.train import train_lora

    started = time.perf_counter()
    data = Path(args.data)
    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line]
    examples = [
        Example(decode_image((data / r["file_name"]).read_bytes(), r["file_name"]), r["text"], r["file_name"])
        for r in records
    ]
    params = TrainingParams(
        rank=args.rank,
        resolution=args.resolution,
        train_batch_size=args.batch_size,
        max_train_steps=args.steps,
        learning_rate=1e-4,
        seed=0,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        enable_bucketing=False,
        compile=args.compile,
    )
    stamps: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model = Path(args.model)
    train_lora(params, detect_family(model), model, examples, progress=progress)
    return {"stamps": stamps, "wall_s": time.perf_counter() - started}


def child_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Run diffusers' script unmodified; time its progress bar, which ticks once per optimizer step."""
    import torch
    import tqdm.auto

    if args.reference_deps:
        sys.path.append(args.reference_deps)
    torchvision = "installed"
    if not _imports("torchvision.transforms", sys.path):
        # transformers and diffusers decide once whether torchvision exists; let them
        # see that it does not before the stand-in goes on the path for the script.
        import diffusers.utils
        import transformers.utils

        transformers.utils.is_torchvision_available()
        diffusers.utils.is_torchvision_available()
        sys.path.insert(0, str(SHIM))
        torchvision = "shim"
    stamps: list[float] = []
    original_update = tqdm.auto.tqdm.update

    def timed_update(self, n=1):
        if getattr(self, "desc", "") == "Steps":  # the training loop's bar, not dataset/model loading
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return original_update(self, n)

    tqdm.auto.tqdm.update = timed_update
    _no_tracker()
    script = Path(args.reference_dir) / CONFIGS[args.config[0]].reference_script
    out = tempfile.mkdtemp(prefix="bench-ref-out-")
    argv = [
        str(script),
        f"--pretrained_model_name_or_path={args.model}",
        f"--train_data_dir={args.data}",
        f"--resolution={args.resolution}",
        "--center_crop",
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={args.steps}",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        f"--rank={args.rank}",
        f"--mixed_precision={args.mixed_precision}",
        "--seed=0",
        f"--output_dir={out}",
        "--checkpointing_steps=100000000",
        "--dataloader_num_workers=0",
        "--caption_column=text",
    ]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    started = time.perf_counter()
    sys.argv = argv
    runpy.run_path(str(script), run_name="__main__")
    return {"stamps": stamps, "wall_s": time.perf_counter() - started, "torchvision": torchvision}


def _imports(module: str, path: list[str]) -> bool:
    """Whether ``module`` imports cleanly, tried in a throwaway interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    return subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def _no_tracker() -> None:
    """The scripts default to TensorBoard logging; turn trackers off when it is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        import accelerate

        original_init = accelerate.Accelerator.__init__

        def init(self, *a, **k):
            k["log_with"] = None
            original_init(self, *a, **k)

        accelerate.Accelerator.__init__ = init
        accelerate.Accelerator.init_trackers = lambda self, *a, **k: None
        accelerate.Accelerator.log = lambda self, *a, **k: None


# --------------------------------------------------------------------------- parent


def run_child(side: str, config: BenchConfig, model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--config",
        config.name,
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--resolution",
        str(config.resolution),
        "--batch-size",
        str(config.batch_size),
        "--rank",
        str(config.rank),
        "--mixed-precision",
        args.mixed_precision,
    ]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if args.compile and side == "ours":
        command.append("--compile")
    if side == "reference":
        command += ["--reference-dir", args.reference_dir]
        if args.reference_deps:
            command += ["--reference-deps", args.reference_deps]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    marker = "BENCH_RESULT "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        return {"side": side, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1][len(marker) :])


def summarise(side: str, config: BenchConfig, raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if "error" in raw:
        return {"config": config.name, "side": side, "error": raw["error"]}
    rate = steady_rate(raw["stamps"], args.warmup)
    row = {
        "config": config.name,
        "side": side,
        "steps_per_s": round(rate, 4),
        "images_per_s": round(rate * config.batch_size, 4),
        "peak_mem_mb": round(raw["peak_mem_mb"], 1),
        "mem_kind": raw["mem_kind"],
        "wall_s": round(raw["wall_s"], 2),
        "device": raw["device"],
    }
    if "torchvision" in raw:
        row["torchvision"] = raw["torchvision"]
    if config.tflop_per_sample and raw["device"].startswith("cuda"):
        achieved = rate * config.batch_size * config.tflop_per_sample * LORA_STEP_FACTOR
        row["tflops"] = round(achieved, 1)
        row["mfu"] = round(achieved / args.peak_tflops, 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="the CPU configuration (same as --config tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 30 tiny, 25 else)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    parser.add_argument("--images", type=int, default=8, help="dataset size")
    parser.add_argument("--resolution", type=int, help="override the configuration's resolution")
    parser.add_argument("--batch-size", type=int, help="override the configuration's batch size")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet")
    parser.add_argument("--reference-dir", help="folder holding diffusers' train_text_to_image_lora*.py")
    parser.add_argument("--reference-deps", help="extra import path for the reference's datasets/torchvision")
    parser.add_argument("--rounds", type=int, default=1, help="runs per side, alternating; the best counts")
    parser.add_argument("--threads", type=int, help="torch CPU threads in each run (OMP_NUM_THREADS)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    parser.add_argument("--work-dir", help="where models and data are built (default: a cache folder)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.manual_seed(0)
        raw = child_ours(args) if args.child == "ours" else child_reference(args)
        mem, kind = peak_memory_mb()
        raw.update(
            peak_mem_mb=mem,
            mem_kind=kind,
            device="cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        )
        print("BENCH_RESULT " + json.dumps(raw), flush=True)
        return

    import torch

    from lora_pipeline.worker.tiny_model import default_cache_dir, ensure_random_model

    names = list(dict.fromkeys((args.config or []) + (["tiny"] if args.tiny else [])))
    if not names:
        names = ["sd15", "sdxl"] if torch.cuda.is_available() else ["tiny"]
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    work = Path(args.work_dir) if args.work_dir else default_cache_dir() / "bench"
    rows = []
    for name in names:
        base = CONFIGS[name]
        config = BenchConfig(
            name,
            args.resolution or base.resolution,
            args.batch_size or base.batch_size,
            args.rank or base.rank,
            base.tflop_per_sample if not args.resolution else None,
            base.reference_script,
        )
        args.steps = args.steps or (30 if name == "tiny" else 25)
        started = time.perf_counter()
        spec = model_spec(name)
        digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=str).encode()).hexdigest()[:10]
        model = ensure_random_model(spec, work / f"model-{name}-{digest}")
        data = write_dataset(work / f"data-{name}-{config.resolution}-{args.images}", config.resolution, args.images)
        print(f"# {name}: model + data ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        sides = ["ours"] + (["reference"] if args.reference_dir else [])
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):  # alternate sides so background load hits both alike
            for side in sides:
                row = summarise(side, config, run_child(side, config, model, data, args), args)
                print(json.dumps(row), file=sys.stderr)
                if (
                    side not in best
                    or "error" in best[side]
                    or row.get("steps_per_s", 0) > best[side].get("steps_per_s", 0)
                ):
                    best[side] = row
        rows.extend(best[side] for side in sides)
    _print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nsteps={args.steps} warmup={args.warmup} rounds={args.rounds} mixed_precision={args.mixed_precision}")
    print(f"{'config':7} {'side':10} {'steps/s':>9} {'images/s':>9} {'peak MB':>9} {'wall s':>7} {'MFU':>6}  device")
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["side"]] = row
        if "error" in row:
            print(f"{row['config']:7} {row['side']:10} ERROR {row['error'][:500]}")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(
            f"{row['config']:7} {row['side']:10} {row['steps_per_s']:9.3f} {row['images_per_s']:9.3f} "
            f"{row['peak_mem_mb']:9.0f} {row['wall_s']:7.1f} {mfu:>6}  {row['device']} ({row['mem_kind']})"
        )
    for name, sides in by_config.items():
        ours, ref = sides.get("ours"), sides.get("reference")
        if ours and ref and "error" not in ours and "error" not in ref:
            print(
                f"{name}: ours/reference steps/s = {ours['steps_per_s'] / ref['steps_per_s']:.2f}x, "
                f"peak memory = {ours['peak_mem_mb'] / ref['peak_mem_mb']:.2f}x"
            )


if __name__ == "__main__":
    main()
