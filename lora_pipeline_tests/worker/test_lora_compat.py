"""Both files of a version load, every key of them, in the tools style LoRAs are used with,
on the real SD 1.5 and SDXL architectures (random weights; see real_models.py):

* diffusers' ``load_lora_weights`` consumes every key of the diffusers file and of the kohya
  file: each module of the LoRA lands on its own layer with its own weights and alpha/rank
  scale, and no other layer gets one;
* the kohya file loads whole under ComfyUI's key rules (comfy_rules.py), each module on
  the weight it was trained for, at its alpha;
* the kohya file and the diffusers file give the same UNet output, different from the
  base model's (fp32, 8×8 latent, non-zero B matrices).

The LoRA is made by the worker's own ``add_lora`` / ``_lora_layers`` and written by
``write_lora_file`` / ``write_kohya_file``, exactly as a job writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.registry_store.lora_files import verify_local_file
from lora_pipeline.worker.artifact import ArtifactFacts, provenance_metadata, write_kohya_file, write_lora_file
from lora_pipeline.worker.families import Loaded
from lora_pipeline.worker.train import _lora_layers, add_lora
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.real_models import SPECS, Components, build

pytestmark = pytest.mark.slow

# alpha ≠ rank: the scale alpha/rank must reach every loader; the text encoders train too.
PARAMS = TrainingParams(rank=4, alpha=2, train_text_encoder=True, trigger_word="geoshapes style")
SCALE = 2 / 4
COMPONENTS = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}
COMFY = {"sd1": (comfy_rules.SD15, {"clip_l": 12}), "sdxl": (comfy_rules.SDXL, {"clip_l": 12, "clip_g": 32})}

# component → module path → a sketch of ΔW = B·A·scale: ΔW times a fixed random matrix. Two
# different ΔW give different sketches (with probability 1), and a sketch never builds ΔW
# itself (SDXL's would be gigabytes).
Deltas = dict[str, dict[str, torch.Tensor]]
_PROBES: dict[int, torch.Tensor] = {}


def _sketch(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    down = down.detach().flatten(1)
    probe = _PROBES.get(down.shape[1])
    if probe is None:
        probe = _PROBES[down.shape[1]] = torch.randn(down.shape[1], 2, generator=torch.Generator().manual_seed(5))
    return up.detach().flatten(1) @ (down @ probe) * scale


@dataclass
class Published:
    family: str
    diffusers: Path
    kohya: Path
    expected: Deltas  # what training produced, per module
    outputs: dict[str, torch.Tensor]  # base / diffusers / kohya → UNet output
    loaded: dict[str, Deltas]  # diffusers / kohya → what load_lora_weights put on the model


def _inputs(family: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    unet_config, clips = SPECS[family]
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, unet_config["cross_attention_dim"], generator=gen),
    }
    if family == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, clips[1]["projection_dim"], generator=gen),
            "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]),
        }
    return inputs


def _forward(components: Components, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return components.unet(**inputs).sample


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(steps_offset=1, clip_sample=False)  # a pipeline warns about older defaults


def _pipeline(components: Components):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family == "sdxl":
        te1, te2 = components.text_encoders
        return StableDiffusionXLPipeline(
            vae=None,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=None,
            tokenizer_2=None,
            unet=components.unet,
            scheduler=_scheduler(),
        )
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=components.text_encoders[0],
        tokenizer=None,
        unet=components.unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _modules(components: Components) -> dict[str, Any]:
    return dict(zip(COMPONENTS[components.family], [components.unet, *components.text_encoders], strict=True))


def _loaded_deltas(components: Components) -> Deltas:
    """ΔW = B·A·scale of every peft LoRA layer on the model, whatever adapter name it got."""
    out: Deltas = {}
    for component, module in _modules(components).items():
        found = {}
        for name, layer in module.named_modules():
            adapters = list(getattr(layer, "lora_A", {}) or {})
            if adapters:
                (adapter,) = adapters
                found[name] = _sketch(
                    layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, layer.scaling[adapter]
                )
        out[component] = found
    return out


def _trained_deltas(layers: dict[str, dict[str, torch.Tensor]]) -> Deltas:
    out: Deltas = {}
    for component, state in layers.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            for suffix, role in (
                (".lora.down.weight", "down"),
                (".lora.up.weight", "up"),
                (".lora_linear_layer.down.weight", "down"),
                (".lora_linear_layer.up.weight", "up"),
            ):
                if key.endswith(suffix):
                    modules.setdefault(key[: -len(suffix)], {})[role] = tensor
        out[component] = {m: _sketch(p["up"], p["down"], SCALE) for m, p in modules.items()}
    return out


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Published:
    family = request.param
    folder = tmp_path_factory.mktemp(f"compat-{family}")
    inputs = _inputs(family)
    trained = build(family)
    outputs = {"base": _forward(trained, inputs)}

    models = Loaded(trained.unet, None, trained.text_encoders, [], None)
    torch.manual_seed(1)
    add_lora(models, PARAMS)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in _modules(trained).values():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    unet_layers, te_layers, te2_layers = _lora_layers(models, PARAMS)
    layers = {"unet": unet_layers, "text_encoder": te_layers}
    configs = {
        "unet": trained.unet.peft_config["default"].to_dict(),
        "text_encoder": trained.text_encoders[0].peft_config["default"].to_dict(),
    }
    if family == "sdxl":
        layers["text_encoder_2"] = te2_layers
        configs["text_encoder_2"] = trained.text_encoders[1].peft_config["default"].to_dict()
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    facts = ArtifactFacts(
        style="geo",
        version="V3",
        job_id="job-1-e1",
        request_id="req-1",
        dataset_hash="ab" * 32,
        base_model="store:models/real",
        family=family,
        params=PARAMS,
        steps=10,
        num_train_images=8,
        tag_frequency={"geoshapes style": 8},
        training_seconds=1.0,
        started_at=now,
        finished_at=now,
        final_loss=0.1,
    )
    diffusers_file = write_lora_file(
        folder / "geo_v3.safetensors",
        family,
        unet_layers,
        provenance_metadata(facts),
        text_encoder_lora=te_layers,
        text_encoder_2_lora=te2_layers,
        adapter_configs=configs,
    )
    kohya_file = write_kohya_file(
        diffusers_file, folder / "geo_v3_kohya.safetensors", denoiser_config=dict(trained.unet.config)
    )
    del trained, models

    loaded = {}
    fresh = build(family)  # the same base weights
    pipeline = _pipeline(fresh)
    for label, path in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        pipeline.load_lora_weights(str(path))
        loaded[label] = _loaded_deltas(fresh)
        outputs[label] = _forward(fresh, inputs)
        pipeline.unload_lora_weights()
    return Published(family, diffusers_file, kohya_file, _trained_deltas(layers), outputs, loaded)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_diffusers_consumes_every_key_of_each_file(published: Published, layout: str) -> None:
    loaded = published.loaded[layout]
    with safe_open(str(getattr(published, layout)), framework="pt") as handle:
        keys = list(handle.keys())
    per_module = 3 if layout == "kohya" else 2  # down, up (+ alpha)
    assert len(keys) == per_module * sum(len(m) for m in published.expected.values())
    for component, expected in published.expected.items():
        assert expected, f"{component}: the LoRA has no module to check"
        got = loaded[component]
        assert sorted(got) == sorted(expected), f"{layout} file, {component}: modules differ"
        torch.testing.assert_close(
            torch.cat([got[m] for m in sorted(expected)]),
            torch.cat([expected[m] for m in sorted(expected)]),
            atol=1e-8,
            rtol=1e-5,
        )


def test_the_kohya_file_loads_whole_under_comfyuis_rules(published: Published) -> None:
    config, clip = COMFY[published.family]
    lora = load_file(str(published.kohya))
    patches, not_loaded = comfy_rules.load_lora(lora, comfy_rules.lora_key_map(config, clip))
    assert not_loaded == []
    assert len(patches) * 3 == len(lora)
    to_diffusers = {
        f"diffusion_model.{s}": d[: -len(".weight")]
        for d, s in comfy_rules.unet_to_sgm(config).items()
        if s.endswith(".weight")
    }
    clip_components = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    model = build(published.family, meta=True)
    shapes = {c: {k[: -len(".weight")]: v.shape for k, v in m.state_dict().items()} for c, m in _modules(model).items()}
    for target, patch in patches.items():
        if target.startswith("diffusion_model."):
            component, module = "unet", to_diffusers[target]
        else:
            name, _, rest = target.partition(".transformer.")
            component, module = clip_components[name], rest[: -len(".weight")]
            if component == "text_encoder":  # transformers 5's CLIPTextModel has no text_model level
                module = module.removeprefix("text_model.")
        assert module in published.expected[component], f"{target}: not a module the LoRA trained"
        torch.testing.assert_close(
            _sketch(patch.up, patch.down, patch.alpha / patch.down.shape[0]),
            published.expected[component][module],
            atol=1e-8,
            rtol=1e-5,
        )
        shape = shapes[component][module]
        assert (patch.up.shape[0], patch.down.flatten(1).shape[1]) == (shape[0], shape[1:].numel()), (
            f"{target}: the LoRA's shape is another layer's"
        )


def test_the_kohya_and_the_diffusers_file_give_the_same_unet_output(published: Published) -> None:
    base, via_diffusers, via_kohya = (published.outputs[k] for k in ("base", "diffusers", "kohya"))
    scale = base.abs().max().item()
    changed = (via_diffusers - base).abs().max().item()
    assert changed > 1e-2 * scale, f"the LoRA barely changed the output ({changed:.2e}): nothing was checked"
    # The loaders order the same float operations differently (kohya's alpha becomes a scale
    # later); through the whole UNet that is ~1e-6 of the output, the LoRA's effect ~1e-1.
    torch.testing.assert_close(via_kohya, via_diffusers, atol=1e-5 * scale, rtol=0)


def test_each_header_tells_the_truth_about_its_file(published: Published) -> None:
    headers = {}
    for layout in ("diffusers", "kohya"):
        path = getattr(published, layout)
        header, tensors_sha, _ = verify_local_file(path)
        assert header.layout == layout and header.checksum == tensors_sha
        headers[layout] = header.metadata
    diffusers, kohya = headers["diffusers"], headers["kohya"]
    ours = {k: v for k, v in diffusers.items() if k.startswith("lora_pipeline.")}
    assert {k: v for k, v in kohya.items() if k.startswith("lora_pipeline.")} == {
        **ours,
        "lora_pipeline.layout": "kohya",
        "lora_pipeline.tensors_sha256": kohya["sshs_model_hash"],
    }
    assert not [k for k in diffusers if k.startswith(("ss_", "modelspec.", "sshs_"))]
    adapters = json.loads(diffusers["lora_adapter_metadata"])
    assert adapters["unet.lora_alpha"] == 2 and adapters["unet.r"] == 4
    sdxl = published.family == "sdxl"
    assert kohya["ss_network_module"] == "networks.lora"
    assert (kohya["ss_network_dim"], kohya["ss_network_alpha"]) == ("4", "2.0")
    assert kohya["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert kohya["ss_sd_model_name"] == "real"
    assert kohya["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora"
    )
    assert kohya["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers"
    )
    assert kohya["modelspec.prediction_type"] == "epsilon"
    assert kohya["modelspec.trigger_phrase"] == "geoshapes style"
    assert kohya["modelspec.title"] == kohya["ss_output_name"] == "geo_v3"
