"""The SavedModel serving contract: the only coupling between the service and `models/`.

The service owns this module; the offline code imports it, never the reverse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "slices"
IMAGE_SIZE = 512
# float32 [N, 512, 512, 1], raw stored values (HU + 1024, the Siemens SOMATOM Scope domain).
INPUT_SHAPE = (None, IMAGE_SIZE, IMAGE_SIZE, 1)
INPUT_DTYPE = "float32"
INPUT_DOMAIN = "stored value = HU + 1024, clipped at 0 (float32, not normalised)"
OUTPUT_COVID = "covid_probability"  # [N]
OUTPUT_PROBABILITIES = "probabilities"  # [N, 2]
CLASS_NAMES = ("covid", "normal")  # index 0 = covid, as in the paper
COVID_CLASS = 0
CARD_FILENAME = "model_card.json"  # inside the SavedModel's assets/

WeightsSource = Literal["untrained", "trained", "imported"]


class ContractError(ValueError):
    """A SavedModel that does not keep this contract: the service refuses to serve it."""


def _shape(spec: Any) -> tuple[int | None, ...] | None:
    return tuple(spec.shape.as_list()) if spec.shape.rank is not None else None


def check_signature(fn: Any) -> None:
    """Check a loaded `serving_default` concrete function against the contract: exactly one
    input `slices` float32 [None, 512, 512, 1]; exactly the outputs `covid_probability`
    float32 [None] and `probabilities` float32 [None, 2]. Raises ContractError. The export
    (models/export.py) and the service's loader (app/inference.py) both call this."""
    args, kwargs = fn.structured_input_signature
    if args or set(kwargs) != {INPUT_NAME}:
        raise ContractError(
            f"signature input must be exactly '{INPUT_NAME}'. "
            f"Received: args={args}, kwargs={sorted(kwargs)}"
        )
    spec = kwargs[INPUT_NAME]
    if _shape(spec) != INPUT_SHAPE or spec.dtype.name != INPUT_DTYPE:
        raise ContractError(
            f"input '{INPUT_NAME}' must be {INPUT_DTYPE} {INPUT_SHAPE}. "
            f"Received: {spec.dtype.name} {_shape(spec)}"
        )
    expected = {OUTPUT_COVID: (None,), OUTPUT_PROBABILITIES: (None, len(CLASS_NAMES))}
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or set(outputs) != set(expected):
        received = sorted(outputs) if isinstance(outputs, dict) else outputs
        raise ContractError(f"signature outputs must be {sorted(expected)}. Received: {received}")
    for name, shape in expected.items():
        out = outputs[name]
        if _shape(out) != shape or out.dtype.name != "float32":
            raise ContractError(
                f"output '{name}' must be float32 {shape}. "
                f"Received: {out.dtype.name} {_shape(out)}"
            )


class ModelCard(BaseModel):
    """What the service tells every caller about the weights it serves."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = "fpn-resnet50v2-covidctset"
    version: str
    architecture: str = "FPN-ResNet50V2 (Rahimzadeh et al. 2021, section 2.3)"
    input_domain: str = INPUT_DOMAIN
    input_shape: list[int | None] = Field(default_factory=lambda: list(INPUT_SHAPE))
    class_names: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    weights_source: WeightsSource
    weights_detail: str = ""
    training_data: str | None = None
    fold: int | None = None
    metrics: dict[str, Any] | None = None
    parameters: int | None = None
    created_at: str

    @property
    def untrained(self) -> bool:
        return self.weights_source == "untrained"


def card_path(saved_model_dir: str | Path) -> Path:
    return Path(saved_model_dir) / "assets" / CARD_FILENAME


def read_card(saved_model_dir: str | Path) -> ModelCard:
    return ModelCard.model_validate_json(card_path(saved_model_dir).read_text())


def write_card(saved_model_dir: str | Path, card: ModelCard) -> Path:
    path = card_path(saved_model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return path
