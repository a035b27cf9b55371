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
