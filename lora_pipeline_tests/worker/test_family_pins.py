"""The UNet families train exactly as they did before the family protocol: a few steps' losses
and the LoRA's weight sum on the tiny models, recorded on the commit before the refactor.

The values were bit-exact on the machine that recorded them; the tolerance (1e-5 relative)
only absorbs another CPU's kernels. A changed draw, target, conditioning or step order moves
them by far more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.levers import SpeedLevers
from lora_pipeline.worker.train import train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

# (losses of steps 1-4, sum of the UNet LoRA's weights), recorded at 005ac18.
PINNED = {
    "sd1": ([1.1355507373809814, 1.0814471244812012, 1.1173624992370605, 1.0489213466644287], -48.822840885829464),
    "sd1_te": ([1.1355507373809814, 1.0814807415008545, 1.1168808937072754, 1.0481280088424683], -48.818720708588444),
    "sdxl": ([1.1091924905776978, 1.1105952262878418, 1.160274863243103, 1.138878345489502], 12.945883145854168),
    "sdxl_te": ([1.1091924905776978, 1.1105098724365234, 1.1598681211471558, 1.1389509439468384], 12.93662504569329),
    "sd2_v": ([0.9219682216644287, 0.3180134892463684, 0.5025701522827148, 0.8347851037979126], None),
}


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


@pytest.fixture(scope="module")
def v_prediction_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 model with a v-prediction scheduler (what an SD 2.x 768-v base declares)."""
    folder = tmp_path_factory.mktemp("tiny-v") / "model"
    shutil.copytree(tiny_model, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("case", "family", "train_text_encoder"),
    [("sd1", "sd1", False), ("sd1_te", "sd1", True), ("sdxl", "sdxl", False), ("sdxl_te", "sdxl", True)],
)
def test_unet_families_train_as_before_the_family_protocol(
    case: str,
    family: str,
    train_text_encoder: bool,
    tiny_model: Path,
    tiny_sdxl_model: Path,
    examples: list[Example],
) -> None:
    model = tiny_sdxl_model if family == "sdxl" else tiny_model
    params = quick_params(max_train_steps=4, train_text_encoder=train_text_encoder)
    outcome = train_lora(params, family, model, examples, levers=SpeedLevers(log_every=1))  # type: ignore[arg-type]
    losses, weight_sum = PINNED[case]
    assert outcome.losses == pytest.approx(losses, rel=1e-5, abs=0)
    assert sum(float(v.double().sum()) for v in outcome.denoiser_lora.values()) == pytest.approx(weight_sum, rel=1e-5)


def test_v_prediction_trains_as_before_the_family_protocol(v_prediction_model: Path, examples: list[Example]) -> None:
    outcome = train_lora(
        quick_params(max_train_steps=4), "sd2", v_prediction_model, examples, levers=SpeedLevers(log_every=1)
    )
    assert outcome.losses == pytest.approx(PINNED["sd2_v"][0], rel=1e-5, abs=0)
