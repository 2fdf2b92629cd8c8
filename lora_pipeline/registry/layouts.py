"""The two key layouts a LoRA file of a version comes in, and which one users get by default.

Every version the worker trains is published twice (README, "LoRA files"):

* ``kohya``: the layout of kohya's sd-scripts, which ComfyUI, AUTOMATIC1111/Forge,
  kohya's own tools and LoRA managers load (``lora_unet_…``, ``lora_te_…``/
  ``lora_te1_…``/``lora_te2_…``, ``.lora_down``/``.lora_up`` + ``.alpha``);
* ``diffusers``: the diffusers/peft layout ``load_lora_weights`` reads (``unet.…`` or, for
  the diffusion transformers (FLUX.1 …), ``transformer.…``; ``text_encoder.…``,
  ``text_encoder_2.…``).

A file's layout is read from its own tensor names (never from its name or a
header value), so a file written by another tool, or an old one, is classified
the same way. The primary layout (the setting ``LORA_PRIMARY_FORMAT``, handed in by
callers) names the layout the legacy ``loraUrl`` points at. Pure and I/O-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

KOHYA = "kohya"
DIFFUSERS = "diffusers"
UNKNOWN = "unknown"  # neither: a LoRA some other tool wrote (still a valid file)
LAYOUTS = (KOHYA, DIFFUSERS)

DEFAULT_PRIMARY = KOHYA  # the default of LORA_PRIMARY_FORMAT (lora_pipeline.settings), which callers pass

# Header value with the SHA-256 of the file's tensor data (the bytes after the header):
# ours on both layouts; sd-scripts writes the same digest as ``sshs_model_hash``.
CHECKSUM_KEY = "lora_pipeline.tensors_sha256"
KOHYA_CHECKSUM_KEY = "sshs_model_hash"

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")


def layout_of(tensor_names: Iterable[str]) -> str:
    """``kohya`` when every tensor has a kohya module prefix, ``diffusers`` when every one
    names a pipeline component, else ``unknown``."""
    names = [n for n in tensor_names if n != "__metadata__"]
    if not names:
        return UNKNOWN
    if all(n.startswith(_KOHYA_PREFIXES) for n in names):
        return KOHYA
    if all(n.startswith(_DIFFUSERS_PREFIXES) for n in names):
        return DIFFUSERS
    return UNKNOWN


def tensors_checksum(metadata: Mapping[str, str]) -> str | None:
    """The SHA-256 (hex) of the tensor data a header declares, if it declares one."""
    for key in (CHECKSUM_KEY, KOHYA_CHECKSUM_KEY):
        value = metadata.get(key, "").strip().lower().removeprefix("0x")
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            return value
    return None


def check_layout(value: str, what: str | None = None) -> str:
    """``value`` if it names a layout users download (kohya or diffusers), else ValueError."""
    if value not in LAYOUTS:
        raise ValueError(f"{what + ': ' if what else ''}expected one of {', '.join(LAYOUTS)}, got {value!r}")
    return value
