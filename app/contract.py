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
INPUT_DOMAIN = "stored value = HU + 1024, clipped at 0 (float32, not scaled)"
# What the graph does to `slices` before its first convolution (DESIGN.md section 3, "No
# scaling of the input"): the paper's network takes the raw stored values as they are.
PREPROCESSING_NONE = "none: raw stored values (HU + 1024)"
OUTPUT_COVID = "covid_probability"  # [N]
OUTPUT_PROBABILITIES = "probabilities"  # [N, 2]
CLASS_NAMES = ("covid", "normal")  # index 0 = covid, as in the paper
COVID_CLASS = 0
# The second signature, `explain` (optional: a model without it still serves, but cannot
# explain): the same input as serving_default, treated the same way, and its two outputs,
# plus Grad-CAM of the covid class (models/explain.py, docs/explain.md).
EXPLAIN_SIGNATURE_KEY = "explain"
OUTPUT_HEATMAP = "heatmap"  # float32 [N, 512, 512] in [0, 1], each slice's map over its max
OUTPUT_HEATMAP_EMPTY = "heatmap_empty"  # bool [N]: the map is zero everywhere (nothing shown)
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
    _check_input(fn)
    expected = {OUTPUT_COVID: (None,), OUTPUT_PROBABILITIES: (None, len(CLASS_NAMES))}
    _check_outputs(fn, {name: (shape, "float32") for name, shape in expected.items()})


def check_explain_signature(fn: Any) -> None:
    """Check a loaded `explain` concrete function: the input of `check_signature`; exactly
    its outputs plus `heatmap` float32 [None, 512, 512] and `heatmap_empty` bool [None].
    Raises ContractError. Separate from `check_signature`: explaining is optional."""
    _check_input(fn)
    _check_outputs(
        fn,
        {
            OUTPUT_COVID: ((None,), "float32"),
            OUTPUT_PROBABILITIES: ((None, len(CLASS_NAMES)), "float32"),
            OUTPUT_HEATMAP: ((None, IMAGE_SIZE, IMAGE_SIZE), "float32"),
            OUTPUT_HEATMAP_EMPTY: ((None,), "bool"),
        },
    )


def _check_input(fn: Any) -> None:
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


def _check_outputs(fn: Any, expected: dict[str, tuple[tuple[int | None, ...], str]]) -> None:
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or set(outputs) != set(expected):
        received = sorted(outputs) if isinstance(outputs, dict) else outputs
        raise ContractError(f"signature outputs must be {sorted(expected)}. Received: {received}")
    for name, (shape, dtype) in expected.items():
        out = outputs[name]
        if _shape(out) != shape or out.dtype.name != dtype:
            raise ContractError(
                f"output '{name}' must be {dtype} {shape}. "
                f"Received: {out.dtype.name} {_shape(out)}"
            )


# --- preprocessing: what the graph does to the input before its first weighted op ---------

# Ops that move, pad or retype values without computing on them.
_LAYOUT_OPS = frozenset(
    {"Identity", "IdentityN", "Snapshot", "StopGradient", "EnsureShape", "Pad", "PadV2",
     "MirrorPad", "Reshape", "ExpandDims", "Squeeze", "Cast"}
)  # fmt: skip
# Ops that read only the input's shape: nothing flows on from them.
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
# The network's first learned layer: where preprocessing ends.
_WEIGHTED_OPS = frozenset(
    {"Conv2D", "Conv3D", "DepthwiseConv2dNative", "_FusedConv2D", "MatMul", "BatchMatMul",
     "BatchMatMulV2", "BatchMatMulV3", "Einsum"}
)  # fmt: skip
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def states_no_preprocessing(text: str) -> bool:
    """True for a card's `preprocessing` that says none ("none: raw stored values ...")."""
    return text.split(":", 1)[0].strip().lower() == "none"


class _Scope:
    """One graph or function body: its nodes, who reads each tensor, what it returns."""

    def __init__(self, nodes: Any, returns: set[str]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.returns = returns
        self.readers: dict[str, list[tuple[Any, int]]] = {}
        for node in nodes:
            for position, ref in enumerate(r for r in node.input if not r.startswith("^")):
                self.readers.setdefault(ref.split(":")[0], []).append((node, position))


def input_preprocessing(fn: Any) -> list[str]:
    """The ops that compute on `slices` on its way to the first weighted op, sorted by type.

    Walks the graph of a loaded `serving_default` concrete function (into the functions it
    calls) forward from the input placeholder, and stops at each convolution or matrix
    product. An op on the way counts when it changes values (anything but padding,
    reshaping, identities and casts) and a weighted op can be reached from it; ops that read
    only the input's shape do not count. Empty for a network that takes its input as it is.
    """
    graph_def = fn.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    scopes: dict[str, _Scope] = {"": _Scope(graph_def.node, set())}
    found: set[tuple[str, str, str]] = set()
    memo: dict[tuple[str, str], tuple[bool, bool]] = {}

    def scope(name: str) -> _Scope:
        if name not in scopes:
            f = library[name]
            returns = {ref.split(":")[0] for ref in f.ret.values()}
            scopes[name] = _Scope(f.node_def, returns)
        return scopes[name]

    def walk(where: str, tensor: str) -> tuple[bool, bool]:
        """(reaches a weighted op, reaches the scope's return) from `tensor` in `where`."""
        key = (where, tensor)
        if key in memo:
            return memo[key]
        memo[key] = (False, False)  # a cycle (loop bodies) adds nothing
        here = scope(where)
        weighted, returned = False, tensor in here.returns
        for node, position in here.readers.get(tensor, []):
            if node.op in _WEIGHTED_OPS:
                weighted = True
            elif node.op in _SHAPE_OPS:
                continue
            elif node.op in _CALL_OPS or node.op in library:
                callee = node.attr["f"].func.name if node.op in _CALL_OPS else node.op
                arg = library[callee].signature.input_arg[position].name
                inner, out = walk(callee, arg)
                after = walk(where, node.name) if out else (False, False)
                weighted |= inner or after[0]
                returned |= after[1]
            else:
                after = walk(where, node.name)
                weighted |= after[0]
                returned |= after[1]
                if after[0] and node.op not in _LAYOUT_OPS:
                    found.add((node.op, where, node.name))
        memo[key] = (weighted, returned)
        return memo[key]

    walk("", fn.inputs[0].op.name)  # the input placeholder: the flat inputs come first
    return sorted(op for op, _, _ in found)


def check_preprocessing(fn: Any, card: ModelCard) -> None:
    """The card's `preprocessing` must agree with the graph (`input_preprocessing`).

    A card saying none ("none: raw stored values ...") needs a graph that hands `slices` to
    its first convolution unchanged; any other text needs a graph that computes something
    there. Raises ContractError. This checks the graph itself, not its outputs: a probe
    scaling the input would miss a constant scaling (x / 4096 still changes the outputs)
    and would refuse a raw network whose outputs are flat or saturated.
    """
    stated = card.preprocessing
    if stated is None:
        raise ContractError(
            "the model card does not state the input preprocessing (field 'preprocessing'). "
            f"Received: card version {card.version}"
        )
    ops = input_preprocessing(fn)
    if states_no_preprocessing(stated) and ops:
        raise ContractError(
            f"the model card says preprocessing {stated!r}, but the graph computes on "
            f"'{INPUT_NAME}' before its first convolution. Received: ops {ops}"
        )
    if not states_no_preprocessing(stated) and not ops:
        raise ContractError(
            f"the model card says preprocessing {stated!r}, but the graph hands "
            f"'{INPUT_NAME}' to its first convolution unchanged. Received: no ops"
        )


# --- the model card (Mitchell et al. 2019, "Model Cards for Model Reporting") ------------

INTENDED_USE = (
    "Decision support for research: tells COVID-19 from normal lungs, per slice and per "
    "patient, on axial non-contrast chest CT of adults, as raw stored values (HU + 1024) "
    "like those of COVID-CTset (Siemens SOMATOM Scope, Sari, Iran, 2020). A clinician "
    "makes the diagnosis; this is not a certified medical device."
)
MAIN_LIMITATION = (
    "Trained on COVID-19 and normal scans only: COVID-CTset holds no other pneumonia, so a "
    "patient with community-acquired (bacterial or other viral) pneumonia may well be "
    "called COVID-19."
)
OUT_OF_SCOPE_USES = (
    "Telling COVID-19 from other pneumonias or lung diseases (none in COVID-CTset): any "
    "such disease may be called COVID-19.",
    "Children: the network was neither trained nor checked on paediatric scans.",
    "Contrast-enhanced studies: COVID-CTset is not known to hold any; contrast changes the "
    "stored values the network reads.",
    "Series that are not axial chest CT (reformats, other body regions): the service sets "
    "non-axial series aside; other regions are judged only if the open-lung rule keeps "
    "slices.",
    "Screening populations, or a diagnosis without a clinician's review.",
)
LIMITATIONS = (
    MAIN_LIMITATION,
    "One scanner and one centre in training (Siemens SOMATOM Scope, Negin Medical Center, "
    "Sari, Iran, March-April 2020): other scanners, doses and reconstruction kernels are "
    "outside the training data.",
    "The network reads raw stored values (HU + 1024); a series converted to another range "
    "(windowed, 8-bit, normalised) gives meaningless scores.",
)
COVID_CTSET = (
    "COVID-CTset (Rahimzadeh et al. 2021): 15,589 slices of 95 COVID-19 patients and 48,260 "
    "slices of 282 normal persons (16-bit TIFF stored values, five folds)"
)


def card_use_fields() -> dict[str, Any]:
    """The fields of intended use and limits every card carries (Mitchell et al. 2019).

    The one place these texts come from: `complete_card` fills them into any card that
    lacks them, and the export calls it, so the cards of build-default, export, import and
    training all carry them.
    """
    return {
        "preprocessing": PREPROCESSING_NONE,
        "intended_use": INTENDED_USE,
        "out_of_scope_uses": list(OUT_OF_SCOPE_USES),
        "limitations": list(LIMITATIONS),
    }


class ModelCard(BaseModel):
    """What the service tells every caller about the weights it serves.

    The use fields (`preprocessing` … `limitations`) are None only in cards written before
    they existed; `complete_card` fills them.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = "fpn-resnet50v2-covidctset"
    version: str
    architecture: str = "FPN-ResNet50V2 (Rahimzadeh et al. 2021, section 2.3)"
    input_domain: str = INPUT_DOMAIN
    input_shape: list[int | None] = Field(default_factory=lambda: list(INPUT_SHAPE))
    class_names: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    preprocessing: str | None = Field(
        None, description="what the graph does to `slices` before its first convolution"
    )
    intended_use: str | None = None
    out_of_scope_uses: list[str] | None = None
    limitations: list[str] | None = Field(None, description="the main limitation first")
    weights_source: WeightsSource
    weights_detail: str = ""
    training_data: str | None = None
    evaluation_data: str | None = None
    fold: int | None = None
    metrics: dict[str, Any] | None = Field(
        None, description="measured figures, each with the data set it was measured on"
    )
    parameters: int | None = None
    created_at: str

    @property
    def untrained(self) -> bool:
        return self.weights_source == "untrained"


def complete_card(card: ModelCard) -> ModelCard:
    """`card` with every use field it lacks filled from `card_use_fields()`."""
    missing = {k: v for k, v in card_use_fields().items() if getattr(card, k) is None}
    return card.model_copy(update=missing) if missing else card


def short_form(card: ModelCard) -> tuple[str, str]:
    """(intended use, main limitation): what every diagnosis answer repeats."""
    limitations = card.limitations or [MAIN_LIMITATION]
    return card.intended_use or INTENDED_USE, limitations[0]


def card_path(saved_model_dir: str | Path) -> Path:
    return Path(saved_model_dir) / "assets" / CARD_FILENAME


def read_card(saved_model_dir: str | Path) -> ModelCard:
    return ModelCard.model_validate_json(card_path(saved_model_dir).read_text())


def write_card(saved_model_dir: str | Path, card: ModelCard) -> Path:
    path = card_path(saved_model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return path
