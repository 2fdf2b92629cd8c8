"""The one Definitions object of the code location (named in workspace.yaml and [tool.dg]).

Every Dagster object lives in a small module under ``lora_pipeline/defs/``; ``defs/pipeline.py``
gathers them, and this file adds the styles declared in ``lora_pipeline/styles/<style>/defs.yaml``
(``LoraTraining`` components). Importing it must stay cheap: Dagster imports the code location
often, so nothing here imports torch, diffusers or peft.

The settings are read first: a bad value fails loading the code location with one line
naming the variable (``SettingsError``), before any Dagster object is built.
"""

from pathlib import Path

from lora_pipeline.settings import get_settings

get_settings()

import lora_pipeline.styles
from lora_pipeline.defs.pipeline import pipeline_with_declared_styles

defs = pipeline_with_declared_styles(lora_pipeline.styles, project_root=Path(__file__).resolve().parents[1])
