"""Styles declared in YAML (``LoraTraining`` components): what a declaration sets, and how the
shared assets, jobs and sensors find it at run time.

A declared style is a partition of the same assets as every other style; what its declaration
adds is per-partition defaults (source, trigger word, base model, a params preset) and
automation. Dagster has no per-partition config, so the declarations are a resource
(``declared_styles``) that the code location binds once, with every declaration it loaded: a run,
a sensor tick or a schedule tick of any style reads the same object, and a style with no
declaration gets ``None`` and today's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict

DEFAULT_BASE_MODEL = "tiny"
# The resource key the assets, the training op and the sensors read the declarations under.
DECLARED_STYLES = "declared_styles"


class StyleDeclaration(BaseModel):
    """A style's settings as its ``defs.yaml`` declares them (validated by the component)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    style: str
    source: str | None = None
    trigger_word: str | None = None
    base_model: str | None = None
    params: dict[str, Any] = {}
    train_on_new_dataset: bool = False
    schedule: str | None = None


# The ``declared_styles`` resource: the declarations by style, read-only.
DeclaredStyles = Mapping[str, StyleDeclaration]


def declared_styles(declarations: Iterable[StyleDeclaration] = ()) -> DeclaredStyles:
    """The ``declared_styles`` resource for ``declarations`` (none: no style is declared)."""
    return MappingProxyType({d.style: d for d in declarations})


def training_choice(
    declaration: StyleDeclaration | None, base_model: str | None, overrides: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The base model and params overrides a run trains with: the run's config first, then the
    style's declaration (its base model, its params preset under the run's params), then the
    default base model. The one rule for the asset, the ``train_lora`` job and the launch check."""
    declared_model = declaration.base_model if declaration else None
    preset = declaration.params if declaration else {}
    return base_model or declared_model or DEFAULT_BASE_MODEL, {**preset, **overrides}
