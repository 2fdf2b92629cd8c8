"""The training loop's speed levers: one switch each, so each can be measured on its own.

What a step costs on a GPU beyond the UNet's own arithmetic is host work the GPU
waits for: a ``.item()`` that drains the queue every step, small host→device copies
and ``torch.stack`` of cached tensors, recompiles when a bucket's last batch is
short, three projections where one matmul would do. Each lever here removes one
such cost, and ``benchmarks/gpu/bench_gpu.py`` measures each alone.

Defaults are provisional: each is either exact (same numbers as before) or the
previous behaviour, until the GPU benchmark has run (README, "GPU training
benchmark"). A deployment sets them without code through ``LORA_TRAIN_LEVERS``
(``"fuse_qkv=1,compile=regional,compile_mode=max-autotune-no-cudagraphs"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F

from lora_pipeline.settings import get_settings
from lora_pipeline.worker.quantize import is_quantized

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

log = logging.getLogger(__name__)

CompileChoice = Literal["off", "full", "regional"]
LEVERS_ENV = "LORA_TRAIN_LEVERS"
# The recompile limit while a compiled UNet trains: each bucket shape is one entry per
# compiled frame, and the default (8) would send a many-bucket dataset back to eager.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class SpeedLevers:
    """How the loop spends an accelerator. ``None`` means: decided by device and params."""

    # Loss to the host (one sync) every N optimizer steps; None: 1 on the CPU, 10 on CUDA.
    log_every: int | None = None
    # Cached latents/embeddings stacked per bucket on the device and indexed, noise drawn
    # on the device; off: per-step torch.stack of cached tensors and noise drawn on the host.
    device_cache: bool = True
    # Fill a bucket's short last batch from the same bucket, so each bucket has one shape
    # (one compiled graph, CUDA-graph friendly); None: on when compiling.
    static_shapes: bool | None = None
    # torch.compile of the UNet: whole, or its repeated transformer blocks; None: params.compile.
    compile: CompileChoice | None = None
    compile_mode: str | None = None  # e.g. "max-autotune-no-cudagraphs"; None: torch's default
    compile_backend: str = "inductor"
    # q/k/v (k/v for cross-attention) as one matmul, LoRA included; exact.
    fuse_qkv: bool = False
    # TF32 for float32 matmuls and cuDNN convolutions (bf16 work is unaffected);
    # None: torch's own settings, untouched (matmul off, cuDNN on).
    tf32: bool | None = None
    # The largest batch that fits in device memory (CUDA), same number of images seen.
    max_batch: bool = False
    max_batch_cap: int = 64
    memory_fraction: float = 0.85
    channels_last: bool = True

    def resolve(self, device: torch.device, params_compile: bool) -> SpeedLevers:
        """Every ``None`` decided for this device; raises ValueError on a bad value."""
        compile_choice = self.compile or ("full" if params_compile else "off")
        if compile_choice not in ("off", "full", "regional"):
            raise ValueError(f"levers.compile: {compile_choice!r} is not one of off, full, regional")
        log_every = self.log_every if self.log_every is not None else (10 if device.type == "cuda" else 1)
        if log_every < 1:
            raise ValueError(f"levers.log_every must be at least 1, got {log_every}")
        if compile_choice != "off":
            check_compile_mode(self.compile_mode, self.compile_backend)
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"levers.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.max_batch_cap < 1:
            raise ValueError(f"levers.max_batch_cap must be at least 1, got {self.max_batch_cap}")
        return dataclasses.replace(
            self,
            log_every=log_every,
            compile=compile_choice,
            static_shapes=self.static_shapes if self.static_shapes is not None else compile_choice != "off",
            channels_last=self.channels_last and device.type == "cuda",
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, value: str | None = None) -> SpeedLevers:
        """Levers from ``value``, default the setting ``LORA_TRAIN_LEVERS`` (``name=value`` pairs,
        comma separated)."""
        return cls.parse(get_settings().train_levers if value is None else value)

    @classmethod
    def parse(cls, text: str, base: SpeedLevers | None = None) -> SpeedLevers:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"{LEVERS_ENV}: {item!r} is not name=value with a name from {sorted(fields)}")
            values[name] = _coerce(name, raw.strip(), fields[name].type)
        return dataclasses.replace(base or cls(), **values)


def _coerce(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    if raw.lower() in ("none", "auto", "") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{LEVERS_ENV}: {name}={raw!r} is not a boolean")
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw


def check_compile_mode(mode: str | None, backend: str) -> None:
    """Refuse a mode torch does not know, before any model is loaded."""
    if mode is None:
        return
    import torch._inductor as inductor

    known = list(inductor.list_mode_options())
    if mode not in known:
        raise ValueError(f"levers.compile_mode: {mode!r} is not one of {known}")
    if backend != "inductor":
        log.info("compile_mode %s applies to the inductor backend; %s ignores it", mode, backend)


def compile_kwargs(levers: SpeedLevers) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"backend": levers.compile_backend}
    if levers.compile_mode and levers.compile_backend == "inductor":
        kwargs["mode"] = levers.compile_mode
    if levers.static_shapes:
        kwargs["dynamic"] = False
    return kwargs


def compile_unet(unet: ModelMixin, levers: SpeedLevers) -> Callable[..., Any]:
    """The UNet to call: compiled whole, or with its transformer blocks compiled in place."""
    if levers.compile == "full":
        return torch.compile(unet, **compile_kwargs(levers))
    if levers.compile == "regional":
        unet.compile_repeated_blocks(**compile_kwargs(levers))
    return unet


@contextlib.contextmanager
def training_settings(levers: SpeedLevers) -> Iterator[None]:
    """Process-wide torch settings the levers need while training, restored afterwards.

    The legacy ``allow_tf32`` flags are used on purpose: inductor and diffusers'
    scripts read them, and mixing them with the newer ``fp32_precision`` settings
    makes torch refuse to answer either.
    """
    matmul = torch.backends.cuda.matmul
    saved_tf32 = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    dynamo_config = None
    saved_limits: dict[str, int] = {}
    if levers.compile not in (None, "off"):
        import torch._dynamo as dynamo

        dynamo_config = dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, name):
                saved_limits[name] = getattr(dynamo_config, name)
                setattr(dynamo_config, name, max(saved_limits[name], RECOMPILE_LIMIT))
    if levers.tf32 is not None:
        matmul.allow_tf32 = levers.tf32
        torch.backends.cudnn.allow_tf32 = levers.tf32
    try:
        yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        for name, value in saved_limits.items():
            setattr(dynamo_config, name, value)


# --------------------------------------------------------------------------- batches


def fill_short_batches(batches: list[list[int]], buckets: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Each short batch topped up with its bucket's images, in the epoch's order.

    A bucket's last batch is short when its image count is not a multiple of the
    batch size; a new shape costs a recompile (or a new CUDA graph) every epoch.
    Topping it up from the same bucket keeps one shape per bucket; the extra images
    are repeats, so an epoch sees a few images twice.
    """
    order: dict[tuple[int, int], list[int]] = {}
    for batch in batches:
        order.setdefault(buckets[batch[0]], []).extend(batch)
    filled = []
    for batch in batches:
        if len(batch) < batch_size:
            members = order[buckets[batch[0]]]
            others = [index for index in members if index not in batch] or members
            batch = batch + [others[k % len(others)] for k in range(batch_size - len(batch))]
        filled.append(batch)
    return filled


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest batch in ``[start, cap]`` for which ``fits`` holds: doubling, then bisection.

    ``start`` is what the user asked for and is kept even if it does not fit (the
    training then fails the way it would have without the lever).
    """
    if cap <= start or not fits(start):
        return start
    good, bad = start, None
    candidate = start
    while bad is None:
        candidate = min(candidate * 2, cap)
        if fits(candidate):
            good = candidate
            if candidate == cap:
                return cap
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def memory_probe(
    device: torch.device, step: Callable[[int], None], memory_fraction: float
) -> Callable[[int], bool] | None:
    """``fits(batch)`` for a device whose memory can be measured (CUDA), else None."""
    if device.type != "cuda":
        return None
    return cuda_fits(step, device, memory_fraction)


def cuda_fits(step: Callable[[int], None], device: torch.device, memory_fraction: float) -> Callable[[int], bool]:
    """``fits(batch)``: one forward+backward at that batch stays under the memory fraction."""

    def fits(batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(batch)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        return peak <= memory_fraction * total

    return fits


# --------------------------------------------------------------------------- fused QKV


class FusedProjection(torch.nn.Module):
    """Several projections of one input (q, k, v; or k, v) as one matmul, their LoRAs as two.

    The base weights are concatenated once and the original layers' weights become
    views of that tensor, so nothing is stored twice. Each part's LoRA (peft's
    ``lora_A``/``lora_B`` of the original layer) stays where peft put it: the saved
    LoRA file is unchanged. The parts are kept outside the module tree for the same
    reason. ``x·A_catᵀ`` is one matmul for every part's down-projection and a
    block-diagonal ``B`` (scaled) one for the up-projections: exactly
    ``Σ B_i A_i x · s_i`` per part.
    """

    weight: torch.Tensor  # buffers, registered in __init__
    bias: torch.Tensor | None
    _parts: tuple[torch.nn.Module, ...]  # set past nn.Module's __setattr__: not submodules

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        bases = [_base_linear(part) for part in parts]
        weight = torch.cat([base.weight.detach() for base in bases])
        has_bias = bases[0].bias is not None
        bias = torch.cat([base.bias.detach() for base in bases]) if has_bias else None
        offset = 0
        for base in bases:
            rows = base.weight.shape[0]
            base.weight.data = weight[offset : offset + rows]
            if bias is not None:  # has_bias
                base.bias.data = bias[offset : offset + rows]
            offset += rows
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        object.__setattr__(self, "_parts", tuple(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loras = [_active_lora(part) for part in self._parts]
        if any(lora is False for lora in loras):  # a part peft would not run plainly: do as peft does
            return torch.cat([part(x) for part in self._parts], dim=-1)
        out = F.linear(x, self.weight, self.bias)
        present = [lora for lora in loras if isinstance(lora, tuple)]  # no False here: returned above
        if not present:
            return out
        lora_a = torch.cat([a.weight for a, _, _ in present])
        h = F.linear(x.to(lora_a.dtype), lora_a)
        blocks = []
        for part, lora in zip(self._parts, loras, strict=True):
            if isinstance(lora, tuple):
                _, lora_b, scaling = lora
                blocks.append(lora_b.weight * scaling)
            else:  # None: no LoRA on this part
                rows = _base_linear(part).weight.shape[0]
                blocks.append(torch.zeros(rows, 0, dtype=lora_a.dtype, device=lora_a.device))
        delta = F.linear(h, torch.block_diag(*blocks))
        return (out + delta).to(out.dtype)


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The layer under a peft LoRA (``base_layer``), else ``module``: a Linear where fuse_qkv checked so."""
    return cast(torch.nn.Linear, getattr(module, "base_layer", module))


def _active_lora(module: torch.nn.Module) -> tuple[Any, Any, float] | None | bool:
    """(lora_A, lora_B, scaling) of a plain, active, unmerged peft LoRA; None: no LoRA;
    False: a LoRA this fusion does not reproduce (dropout, DoRA, merged, several adapters)."""
    if not hasattr(module, "lora_A"):
        return None
    layer: Any = module  # a peft LoraLayer: its adapter attributes are not nn.Module's
    if layer.disable_adapters or layer.merged:
        return False
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return None
    if len(active) != 1:
        return False
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return False
    if layer.lora_B[name].bias is not None:
        return False
    return layer.lora_A[name], layer.lora_B[name], layer.scaling[name]


def fuse_qkv(unet: torch.nn.Module) -> int:
    """Fuse each attention's projections (self: q/k/v, cross: k/v); returns how many were fused.

    An attention is left alone when its projections differ in kind (bias on some
    only), are stored quantized, or carry a LoRA the fusion cannot reproduce exactly (dropout, DoRA).
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    fused = 0
    for module in unet.modules():
        if not isinstance(module, Attention) or not isinstance(module.processor, AttnProcessor2_0):
            continue
        names = ["to_k", "to_v"] if module.is_cross_attention else ["to_q", "to_k", "to_v"]
        parts = [getattr(module, name) for name in names]
        bases = [_base_linear(part) for part in parts]
        if not all(isinstance(base, torch.nn.Linear) and not is_quantized(base) for base in bases):
            continue  # a quantized weight (params.quantize_base) cannot be concatenated
        if len({base.bias is None for base in bases}) != 1 or len({base.in_features for base in bases}) != 1:
            continue
        if any(_active_lora(part) is False for part in parts):
            continue
        projection = FusedProjection(parts)
        # Where diffusers' own fusion puts its fused nn.Linear; FusedProjection is called the same way.
        setattr(module, "to_kv" if module.is_cross_attention else "to_qkv", projection)
        module.fused_projections = True
        # diffusers annotates the parameter with the class AttnProcessor; any processor is accepted.
        module.set_processor(FusedAttnProcessor2_0())  # type: ignore[arg-type]
        fused += 1
    return fused
