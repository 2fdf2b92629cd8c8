"""Random weights for a model folder that holds configs only, built where they will be used.

The GPU machine has no network, and a 12–20B base model saved to its disk and read back
would cost minutes and tens of GB. A folder written by ``bench_families.write_real_folder``
(or ``configs_only`` for the dry run) has every config and tokenizer but no weights, and a
marker file. ``install`` patches ``from_pretrained`` of diffusers' ``ModelMixin`` and
transformers' ``PreTrainedModel``: for a marked folder the class is built from its config
under ``torch.device(device)`` with the default dtype set, so every weight is allocated
once, on the GPU, in the dtype asked for, and filled by the modules' own initialisers (CUDA
kernels: seconds for 20B); any other folder loads as before. Both sides go through it:
ours (``train_lora`` through the family's ``load``) and diffusers' reference scripts,
unmodified (their ``from_pretrained`` calls, and pipelines' ``from_pretrained`` that load
components through the same method).

A call that names no dtype (the reference scripts load, then cast with ``.to(weight_dtype)``)
gets ``default_dtype``, the run's weight dtype: the script's cast is then a no-op, and the
GPU never holds the fp32 copy that the real script keeps in host memory only. Each component
is seeded the same way on both sides, so both train the same random model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

MARKER = "bench_random_weights.json"
_installed: dict[str, Any] = {}


def marked_root(path: Any) -> Path | None:
    """The marked model folder ``path`` names (the folder itself, or one of its components), else None."""
    try:
        folder = Path(path)
    except TypeError:
        return None
    for candidate in (folder, folder.parent):
        if (candidate / MARKER).is_file():
            return candidate
    return None


def _component_folder(path: Any, subfolder: str | None) -> Path:
    folder = Path(path)
    return folder / subfolder if subfolder else folder


def _seed(root: Path, component: Path) -> int:
    base = json.loads((root / MARKER).read_text()).get("seed", 0)
    digest = hashlib.sha256(component.name.encode()).digest()
    return base + int.from_bytes(digest[:4], "little")


@contextlib.contextmanager
def _building(device: str, dtype: Any, seed: int):
    import torch

    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _dtype(kwargs: dict[str, Any], default: Any) -> Any:
    import torch

    dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
    if dtype in (None, "auto"):
        return default
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _refuse_quantization(kwargs: dict[str, Any], component: Path) -> None:
    if kwargs.get("quantization_config") is not None:
        raise NotImplementedError(
            f"{component}: random weights are built from the config, and a quantization_config passed to "
            "from_pretrained is not applied to them; quantize the built model instead (e.g. torchao's quantize_)"
        )


def install(device: str, default_dtype: Any) -> None:
    """Patch both libraries' ``from_pretrained`` (once per process)."""
    import diffusers
    import transformers

    _installed.update(device=device, dtype=default_dtype)
    if "diffusers" in _installed:
        return
    diffusers_original = diffusers.ModelMixin.__dict__["from_pretrained"]
    transformers_original = transformers.PreTrainedModel.__dict__["from_pretrained"]

    def diffusers_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        root = marked_root(pretrained_model_name_or_path)
        if root is None:
            return diffusers_original.__get__(None, cls)(pretrained_model_name_or_path, *args, **kwargs)
        folder = _component_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        _refuse_quantization(kwargs, folder)
        config = cls.load_config(folder)
        with _building(_installed["device"], _dtype(kwargs, _installed["dtype"]), _seed(root, folder)):
            model = cls.from_config(config)
        model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return model.eval()

    def transformers_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        root = marked_root(pretrained_model_name_or_path)
        if root is None:
            return transformers_original.__get__(None, cls)(pretrained_model_name_or_path, *args, **kwargs)
        folder = _component_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        _refuse_quantization(kwargs, folder)
        config = kwargs.get("config") or cls.config_class.from_pretrained(folder)
        dtype = _dtype(kwargs, _installed["dtype"])
        with _building(_installed["device"], dtype, _seed(root, folder)):
            model = cls._from_config(config, dtype=dtype)
        return model.eval()

    diffusers.ModelMixin.from_pretrained = classmethod(diffusers_from_pretrained)
    transformers.PreTrainedModel.from_pretrained = classmethod(transformers_from_pretrained)
    _installed["diffusers"] = diffusers_original
    _installed["transformers"] = transformers_original


def uninstall() -> None:
    """Put the libraries' own ``from_pretrained`` back (tests)."""
    import diffusers
    import transformers

    if "diffusers" in _installed:
        diffusers.ModelMixin.from_pretrained = _installed.pop("diffusers")
        transformers.PreTrainedModel.from_pretrained = _installed.pop("transformers")
