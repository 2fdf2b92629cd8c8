"""The frozen denoiser quantized weight-only, the LoRA trained on top of it (QLoRA's recipe).

The base model's weights are frozen, so they need only be read: stored in int8 or float8
(torchao, one byte per weight) or NF4 (bitsandbytes, half a byte plus a scale per 64
weights) they take a half or a quarter of bf16's memory, and each matmul dequantizes its
weight on the fly. peft attaches LoRA to these layers as to plain ones (its
``TorchaoLoraLinear`` and ``lora.bnb.Linear4bit``): the LoRA's own weights stay unquantized
(fp32 master weights, computed under the run's autocast dtype), so the saved file has the
same keys and shapes as one trained on the unquantized base, and loads into it.

Only the denoiser's big linears are quantized: those inside its repeated transformer blocks
(diffusers' ``_repeated_blocks``; they hold nearly all of a transformer's weights), never
the embedders, norms or the output projection, whose precision matters most and whose
size does not. Text encoders and the VAE are not quantized: they run once, to fill the
cache, and leave the device before training (``train.offload_cached_encoders``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch

from lora_pipeline.contracts.training import QuantizeBase
from lora_pipeline.worker.errors import WorkerInputError

log = logging.getLogger(__name__)

# Which library quantizes each kind, for the error that says it is missing.
_LIBRARY = {"int8": "torchao", "float8": "torchao", "nf4": "bitsandbytes"}


def check_quantization_available(kind: str) -> None:
    """Refuse a kind whose library is not installed, before any model is loaded."""
    library = _LIBRARY.get(kind)
    if library is not None and importlib.util.find_spec(library) is None:
        raise WorkerInputError(
            f"params.quantize_base: {kind!r} needs the {library} package, which is not installed in this "
            "worker; use 'none'" + (" or 'int8'/'float8'" if library == "bitsandbytes" else "")
        )


def big_linears(denoiser: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(name, layer) of each ``nn.Linear`` inside the denoiser's repeated blocks (every linear
    when the model names no repeated blocks)."""
    block_classes = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not block_classes:
        yield from ((n, m) for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear))
        return
    seen: set[str] = set()
    for name, module in denoiser.named_modules():
        if type(module).__name__ not in block_classes:
            continue
        for inner, layer in module.named_modules():
            full = f"{name}.{inner}" if inner else name
            if isinstance(layer, torch.nn.Linear) and full not in seen:
                seen.add(full)
                yield full, layer


def quantize_denoiser(denoiser: torch.nn.Module, kind: QuantizeBase, device: torch.device) -> int:
    """Quantize ``denoiser``'s big linears in place, each moved to ``device`` first, then the rest of
    the denoiser to ``device``; returns how many linears were quantized.

    Each layer is quantized as it reaches the device, so the device never holds the
    whole denoiser unquantized: a 12B transformer loaded on the CPU needs 12 GB of GPU
    memory in int8, not the 24 GB of its bf16 weights.
    """
    if kind == "none":
        denoiser.to(device)
        return 0
    check_quantization_available(kind)
    names = [name for name, _ in big_linears(denoiser)]
    if not names:
        raise WorkerInputError(f"params.quantize_base: {type(denoiser).__name__} has no linear layers to quantize")
    if kind == "nf4":
        _to_nf4(denoiser, names, device)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        wanted = set(names)
        quantize_(denoiser, config, filter_fn=lambda _module, fqn: fqn in wanted, device=device)
    denoiser.to(device)
    denoiser.requires_grad_(False)
    log.info("quantize_base %s: %d linears of %s quantized", kind, len(names), type(denoiser).__name__)
    return len(names)


def _to_nf4(denoiser: torch.nn.Module, names: list[str], device: torch.device) -> None:
    """Each named linear replaced by bitsandbytes' ``Linear4bit`` (NF4, computed in the layer's
    dtype), quantized as it moves to ``device``; the model marked as peft expects of a 4-bit model."""
    import bitsandbytes as bnb

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        linear = getattr(parent, child)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, layer.to(device))
    # peft's LoRA dispatch attaches its 4-bit layer only to a model that says it is loaded in 4 bits.
    model: Any = denoiser
    model.is_loaded_in_4bit = True


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantized (a torchao tensor, or bitsandbytes' 4-bit)."""
    weight = getattr(layer, "weight", None)
    return weight is not None and type(weight) not in (torch.nn.Parameter, torch.Tensor)
