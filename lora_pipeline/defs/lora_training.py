"""``LoraTraining``: a style declared in a ``defs.yaml``, as Dagster components are declared.

    type: lora_pipeline.LoraTraining
    attributes:
      style: watercolor
      source: /data/watercolor          # a folder, a .zip or store:<prefix>
      trigger_word: wtrclr
      base_model: tiny                  # what TrainingConfig.base_model accepts
      params: {rank: 8, max_train_steps: 800}
      automation: on_new_dataset_version
      schedule: "0 3 * * *"             # re-ingest the source nightly

A declared style is a partition of the same assets as any other style: the component builds no
asset, check or job of its own (``declared_style_definitions``). Its settings are the defaults
of that partition's runs (a run's own config still wins); its automation and schedule are the
only objects it adds, a sensor and a schedule on ``PIPELINE``'s jobs. ``PIPELINE`` itself comes
once, from ``pipeline_with_declared_styles``, with every declaration in its ``declared_styles``
resource: Dagster copies what a defs.yaml builds (to link each object to its YAML), so objects
shared by every style cannot come from each component.
The schema is derived from ``TrainingParams``, so ``dg check yaml`` reports a bad preset value
(``rank: 0``, an unknown parameter) at its line, before anything loads.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated, Any

import dagster as dg
from pydantic import BaseModel, Field, ValidationError, WithJsonSchema, create_model, field_validator, model_validator

from lora_pipeline.contracts.families import BaseModelRefused
from lora_pipeline.contracts.problems import describe_validation_error
from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.defs.declared_styles import StyleDeclaration, training_choice
from lora_pipeline.lifecycle.submit import training_params
from lora_pipeline.registry.names import STYLE_PATTERN, InvalidStyleName, validate_style
from lora_pipeline.settings import CRON_PATTERN


class Automation(enum.StrEnum):
    """Whether a new dataset version of the style trains by itself."""

    on_new_dataset_version = "on_new_dataset_version"
    manual = "manual"


def _preset_model() -> type[dg.Model]:
    """Every TrainingParams field, optional (unset: the base model's preset, else the default),
    with its type, choices and range: the schema of ``params``. Derived, not copied, so a new
    training parameter is declarable. Its JSON schema is TrainingParams' own for the field (not
    "this or null"), so ``dg check yaml`` says which bound or choice a value misses."""
    schemas = TrainingParams.model_json_schema()["properties"]
    fields: dict[str, Any] = {}
    for name, field in TrainingParams.model_fields.items():
        schema = {key: value for key, value in schemas[name].items() if key not in ("default", "title")}
        annotation: Any = field.annotation
        metadata = (*field.metadata, WithJsonSchema(schema))
        fields[name] = (Annotated[(annotation | None, *metadata)], Field(None, description=field.description))
    return create_model("TrainingParamsPreset", __base__=dg.Model, **fields)


if TYPE_CHECKING:
    TrainingParamsPreset = dg.Model
else:
    TrainingParamsPreset = _preset_model()


class LoraTrainingScaffolder(dg.Scaffolder):
    """``dg scaffold defs lora_pipeline.LoraTraining <style>``: a declaration of ``<style>`` (the
    folder's name) with every setting shown, the optional ones commented out at their default."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        style = request.target_path.name
        if request.scaffold_format != "yaml" or request.append:
            dg.scaffold_component(request, {"style": style})
            return
        try:
            validate_style(style)
        except InvalidStyleName as exc:
            if request.target_path.is_dir() and not any(request.target_path.iterdir()):
                request.target_path.rmdir()  # the empty folder dg made for it
            raise ValueError(f"{exc} (the folder's name is the style's)") from None
        (request.target_path / "defs.yaml").write_text(SCAFFOLD_TEMPLATE.format(type=request.type_name, style=style))


SCAFFOLD_TEMPLATE = """\
type: {type}
attributes:
  # The style: its partition of training_dataset, trained_lora and lora_registry.
  style: {style}
  # Its images and captions: a folder, a .zip or store:<prefix> (unset: incoming/{style}/ in the store).
  # source: /path/to/images
  # The caption of an image without one (unset: the style's name).
  # trigger_word: {style}
  # The base model: tiny, tiny-sdxl, ..., a diffusers folder, store:<prefix> or a hub id (unset: tiny).
  # base_model: tiny
  # The params preset every run starts from: TrainingParams fields, e.g. {{rank: 16, max_train_steps: 1000}}.
  params: {{}}
  # manual: trains when launched; on_new_dataset_version: each new dataset version trains by itself.
  automation: manual
  # Ingest the source again on this cron (a new dataset version only if it changed).
  # schedule: "0 3 * * *"
"""


@dg.scaffold_with(LoraTrainingScaffolder)
class LoraTraining(dg.Component, dg.Model):
    """A style LoRA the team trains: where its images come from and how it is trained.

    The style is a partition of training_dataset, trained_lora and lora_registry, like a style
    added with `lora-pipeline dataset add`; these settings are its runs' defaults.
    """

    style: str = Field(
        pattern=STYLE_PATTERN,
        description="The style's name (its partition): 1 to 64 letters, digits, '_', '-' or '.', never '..'.",
    )
    source: str | None = Field(
        None,
        description="Where its images and captions are: a local folder, a .zip or 'store:<prefix>'. "
        "Unset: the store's incoming/<style>/ folder.",
    )
    trigger_word: str | None = Field(None, description="Caption for images without one (default: the style name).")
    base_model: str | None = Field(
        None,
        description="The base model (its family is read from it): 'tiny', 'tiny-sdxl', …, a local "
        "diffusers folder, 'store:<prefix>' or a hub id. Unset: 'tiny'.",
    )
    params: TrainingParamsPreset = Field(
        default_factory=TrainingParamsPreset,
        description="The params preset: TrainingParams overrides every run of this style starts "
        "from (a run's own params override them).",
    )
    automation: Automation = Field(
        Automation.manual,
        description="on_new_dataset_version: each new dataset version trains; manual: only when launched.",
    )
    schedule: Annotated[str | None, WithJsonSchema({"type": "string", "pattern": CRON_PATTERN})] = Field(
        None,
        pattern=CRON_PATTERN,
        description="Cron on which the source is ingested again (a new version only if it changed).",
    )

    @field_validator("style")
    @classmethod
    def _style(cls, value: str) -> str:
        try:
            return validate_style(value)
        except InvalidStyleName as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _preset_trains(self) -> LoraTraining:
        """The preset on its base model must make valid TrainingParams (as a run would build them),
        and the base model one a family trains (as far as it can be read here)."""
        try:
            training_params(*training_choice(None, self.base_model, self.preset()))
        except ValidationError as exc:
            raise ValueError(f"params: {describe_validation_error(exc, root='params')}") from None
        except BaseModelRefused as exc:
            raise ValueError(str(exc)) from None
        return self

    def preset(self) -> dict[str, Any]:
        """The params the YAML sets (unset ones left to the base model's preset and the defaults)."""
        return self.params.model_dump(mode="json", exclude_none=True)

    def declaration(self) -> StyleDeclaration:
        return StyleDeclaration(
            style=self.style,
            source=self.source,
            trigger_word=self.trigger_word,
            base_model=self.base_model,
            params=self.preset(),
            train_on_new_dataset=self.automation == Automation.on_new_dataset_version,
            schedule=self.schedule,
        )

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        """The schema of the YAML's attributes is this class itself, validators included: every
        value is checked as the YAML is read (its errors carry the line), and ``dg check yaml``
        checks the same JSON schema. (Dagster's derived schema would also accept a ``{{ }}``
        template string for every field, so a bad choice would pass ``dg check yaml``.)"""
        return cls

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> LoraTraining:
        """The attributes, already a validated LoraTraining (``get_model_cls``)."""
        if not isinstance(attributes, LoraTraining):
            raise ValueError("a LoraTraining defs.yaml needs its attributes (at least `style`)")
        return attributes

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        # Imported here: dg imports this module to list and check component types, and must not
        # need valid settings for that (the pipeline's modules read them as they are built).
        from lora_pipeline.defs.pipeline import declared_style_definitions

        return declared_style_definitions(self.declaration())
