"""Run configuration shared by the training op and the ``trained_lora`` asset."""

from __future__ import annotations

import enum
import types
import typing
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field, create_model

from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.defs.declared_styles import StyleDeclaration, training_choice


class TrainingParamsOverrides(dg.Config):
    """The base of ``TrainingParamsConfig``: what a run's ``params`` override, as a dict."""

    def overrides(self) -> dict[str, Any]:
        """The fields set (None: the preset's or TrainingParams' default), enums as their values."""
        return self.model_dump(mode="json", exclude_none=True)


def _config_type(name: str, annotation: Any) -> Any:
    """The Dagster config type of a TrainingParams field: a Literal becomes a str Enum of its
    values (Dagster config has no Literal; the launchpad offers the values), anything else is
    kept (int, float, bool, str, list[str] and their optionals are Dagster types already)."""
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return enum.Enum(name, {str(v): v for v in values}, type=str)
    members = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if is_union and bool in members and any(typing.get_origin(m) is typing.Literal for m in members):
        # A flag that also takes a word (``gradient_checkpointing: bool | "auto"``): Dagster config
        # has no such union, so it takes any value (``true`` as before, or ``auto``) and
        # TrainingParams checks it at launch, as it checks the ranges.
        return typing.Any
    return annotation


def _params_config() -> type[TrainingParamsOverrides]:
    """A typed config with every TrainingParams field, optional and unset by default.

    Derived from the contract, not copied, so a new training parameter appears in the launchpad
    by itself. Dagster then checks each value's type, the choices of enumerations and unknown
    names as the config is typed (the launchpad marks them live) and before any run is created;
    ranges (``rank >= 1``) are TrainingParams' own checks, run at launch by trained_lora's config
    mapping and by train_lora's step.
    """
    fields: dict[str, Any] = {
        name: (_config_type(name, field.annotation) | None, Field(None, description=field.description))
        for name, field in TrainingParams.model_fields.items()
    }
    return create_model("TrainingParamsConfig", __base__=TrainingParamsOverrides, **fields)


if TYPE_CHECKING:
    TrainingParamsConfig = TrainingParamsOverrides
else:
    TrainingParamsConfig = _params_config()


class TrainingConfig(dg.Config):
    """What to train: the base model and hyperparameter overrides (see TrainingParams)."""

    base_model: str | None = Field(
        None,
        description="'tiny', 'tiny-sdxl', 'tiny-flux1', 'tiny-sd3', 'tiny-z-image', 'tiny-flux2-klein', 'tiny-qwen-image' (built in code), a local diffusers folder, "
        "'store:<prefix>' or a hub id. Unset: the style's declared base model (a LoraTraining defs.yaml), else 'tiny'.",
    )
    model_family: str = Field(
        "auto",
        description="The family the base model must be (sd1, sd2, sdxl, flux1, sd3, flux2-klein, z-image, "
        "qwen-image); 'auto': whatever it is. A base of another family is refused at launch (or, a hub id, "
        "by the worker). Unset params come from the family's preset (docs/worker.md).",
    )
    params: TrainingParamsConfig = Field(
        default_factory=TrainingParamsConfig,
        description="Overrides of lora_pipeline.contracts.training.TrainingParams (unset: the style's "
        "declared params preset, then the base model's family's preset, else its default), e.g. rank: 16, "
        "max_train_steps: 1500, resolution: 768.",
    )
    force: bool = Field(False, description="Train again even if this dataset was trained with these settings.")
    wait_timeout_s: float = Field(6 * 3600, description="How long a run waits for the job to finish.")
    poll_interval_s: float = Field(5.0, description="Seconds between status polls while waiting.")

    def training_choice(self, declaration: StyleDeclaration | None) -> tuple[str, dict[str, Any]]:
        """The base model and params overrides this run trains with (``training_choice``)."""
        return training_choice(declaration, self.base_model, self.params.overrides())
