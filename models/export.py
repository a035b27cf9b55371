"""Export a Keras model as the service's SavedModel, and check an export against the contract.

The SavedModel holds two signatures (app/contract.py). `serving_default`: input `slices`
float32 [N, 512, 512, 1] raw stored values; outputs `covid_probability` [N] and
`probabilities` [N, 2]. `explain`: the same input, the same network and outputs, plus
Grad-CAM of the covid class, `heatmap` [N, 512, 512] and `heatmap_empty` [N]
(models/explain.py). The model card goes in `assets/`, completed with the intended
use, out-of-scope uses, limitations and preprocessing (`contract.complete_card`), and the
check after saving refuses a card and a graph that disagree about preprocessing
(`contract.check_preprocessing`: the paper's network takes the raw values, unscaled).
The weights are stored once
(about 136 MB for 34.06 M float32 values): `keras.Model.export` would store them twice.
The network is rewritten for inference first (models/inference_graph.py): batch norms
folded into the convolution before them, or else computed by the fused kernel.
An export is written beside its destination and renamed into place, so a half-written
directory is never served.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from pydantic import ValidationError

from app import contract
from app.contract import ModelCard
from models.architecture import build_fpn_resnet50v2
from models.explain import make_explain
from models.inference_graph import inference_graph

logger = logging.getLogger(__name__)

UNTRAINED_DETAIL = (
    "Random initialisation (seed {seed}, head dense kernels normal with std "
    "{head_init_std}). NOT trained: its outputs are meaningless. For plumbing and tests "
    "only, never for a diagnosis."
)


# A SavedModel directory that the service could not serve: the contract's own error.
SavedModelContractError = contract.ContractError


# --- export ---------------------------------------------------------------------------------


def serving_module(model: Any) -> tf.Module:
    """A tf.Module that tracks the model's variables once and serves them by the contract:
    `serve` (serving_default) and `explain`, both calling the same `model`."""
    _check_model(model)
    spec = tf.TensorSpec(contract.INPUT_SHAPE, tf.float32, name=contract.INPUT_NAME)

    def serve(slices: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(slices, training=False)
        return {
            contract.OUTPUT_COVID: probabilities[:, contract.COVID_CLASS],
            contract.OUTPUT_PROBABILITIES: probabilities,
        }

    module = tf.Module(name="covidct_serving")
    # A flat list of the variables, not the Keras object graph: the SavedModel needs
    # nothing from Keras to load, and every variable is written exactly once.
    module.model_variables = list(model.variables)
    module.serve = tf.function(serve, input_signature=[spec])
    # Grad-CAM over the very network `serve` calls (at export, the BN-folded copy): the
    # same layers, the same variables, nothing stored twice.
    module.explain = tf.function(make_explain(model), input_signature=[spec])
    return module


def signatures(module: tf.Module) -> dict[str, Any]:
    """The SavedModel's signatures: serving_default and explain."""
    return {contract.SIGNATURE_KEY: module.serve, contract.EXPLAIN_SIGNATURE_KEY: module.explain}


def export_saved_model(
    model: Any,
    out_dir: str | Path,
    card: ModelCard,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write `model` as a SavedModel with `card` in assets/; return the directory.

    `card.parameters` is filled from the model. With `overwrite`, an existing directory is
    replaced; without it, an existing directory is an error. With `verify`, the export is
    loaded and checked (`verify_saved_model`) before it is moved into place.
    """
    out = Path(out_dir)
    _check_destination(out, overwrite=overwrite)
    serving, rewritten = inference_graph(model)
    module = serving_module(serving)
    card = contract.complete_card(card).model_copy(
        update={
            "parameters": int(model.count_params()),  # the paper's count, before the rewrite
            **rewritten,
            "tensorflow_version": tf.__version__,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the export from the service's user
        started = time.perf_counter()
        tf.saved_model.save(module, str(tmp), signatures=signatures(module))
        contract.write_card(tmp, card)
        logger.info(
            "saved %s parameters (%.1f MB) in %.1f s",
            f"{card.parameters:,}",
            directory_size(tmp) / 1e6,
            time.perf_counter() - started,
        )
        if verify:
            verify_saved_model(tmp, require_explain=True)
        _publish(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported SavedModel version %s to %s", card.version, out)
    return out


def untrained_card(
    *, seed: int | None, head_init_std: float, version: str | None = None
) -> ModelCard:
    """The card of a randomly initialised model: says plainly that it is not trained."""
    card = ModelCard(
        version=version or f"0.0.0+untrained.seed{seed}",
        weights_source="untrained",
        weights_detail=UNTRAINED_DETAIL.format(seed=seed, head_init_std=head_init_std),
        training_data="none: random initialisation, never trained",
        evaluation_data="none: an untrained model is not evaluated",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seed=seed,
        head_init_std=head_init_std,
    )
    return contract.complete_card(card)


def build_default(
    out_dir: str | Path,
    *,
    seed: int = 0,
    head_init_std: float = 0.001,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the untrained network and export it: the default model, for plumbing only."""
    _check_destination(Path(out_dir), overwrite=overwrite)
    started = time.perf_counter()
    model = build_fpn_resnet50v2(head_init_std=head_init_std, seed=seed)
    logger.info("built the untrained network in %.1f s", time.perf_counter() - started)
    card = untrained_card(seed=seed, head_init_std=head_init_std, version=version)
    return export_saved_model(model, out_dir, card, overwrite=overwrite)


def directory_size(path: str | Path) -> int:
    """Bytes in all files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _check_model(model: Any) -> None:
    expected_in = contract.INPUT_SHAPE
    if tuple(model.input_shape) != expected_in:
        raise ValueError(
            f"model input must be {expected_in} to keep the serving contract. "
            f"Received: model.input_shape={model.input_shape}"
        )
    expected_out = (None, len(contract.CLASS_NAMES))
    if tuple(model.output_shape) != expected_out:
        raise ValueError(
            f"model output must be {expected_out}. Received: model.output_shape="
            f"{model.output_shape}"
        )


def _check_destination(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; pass overwrite=True to replace it. Received: out_dir={out}"
        )


def _publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished export into place (same filesystem, so each rename is atomic)."""
    if not out.exists():
        tmp.rename(out)
        return
    _check_destination(out, overwrite=overwrite)
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --- verification -----------------------------------------------------------------------------


def verify_saved_model(
    saved_model_dir: str | Path, *, run: bool = True, require_explain: bool = False
) -> Any:
    """Load a SavedModel and check it against app.contract; return the loaded object.

    Checks the signature's input name, shape and dtype, the output names, shapes and
    dtypes, the model card, and that the card's `preprocessing` agrees with the graph (a
    card saying none needs a graph that hands `slices` to its first convolution
    unchanged); with `run`, also one forward pass of a synthetic slice (finite
    probabilities that sum to 1). The `explain` signature, where there is one (required
    with `require_explain`: every export writes it), gets the same checks, and with `run`
    must agree with serving_default and give a map in [0, 1].
    Raises SavedModelContractError. Keep the returned object alive while its signatures
    are used.
    """
    path = Path(saved_model_dir)
    if not (path / "saved_model.pb").is_file():
        raise SavedModelContractError(
            f"not a SavedModel directory (no saved_model.pb). Received: {path}"
        )
    card = _verify_card(path)
    started = time.perf_counter()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # TensorFlow raises many kinds for a broken directory
        raise SavedModelContractError(f"SavedModel does not load: {e}. Received: {path}") from e
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - started)
    if contract.SIGNATURE_KEY not in loaded.signatures:
        raise SavedModelContractError(
            f"SavedModel lacks signature '{contract.SIGNATURE_KEY}'. "
            f"Received: {sorted(loaded.signatures)}"
        )
    fn = loaded.signatures[contract.SIGNATURE_KEY]
    contract.check_signature(fn)
    contract.check_preprocessing(fn, card)
    explain = _explain_signature(loaded, path, required=require_explain)
    if run:
        _verify_forward(fn)
        if explain is not None:
            _verify_explain(fn, explain)
    logger.info("%s keeps the serving contract (%s weights)", path, card.weights_source)
    return loaded


def _explain_signature(loaded: Any, path: Path, *, required: bool) -> Any:
    """The checked `explain` signature, or None where the SavedModel has none."""
    if contract.EXPLAIN_SIGNATURE_KEY not in loaded.signatures:
        if required:
            raise SavedModelContractError(
                f"SavedModel lacks signature '{contract.EXPLAIN_SIGNATURE_KEY}'. "
                f"Received: {sorted(loaded.signatures)}"
            )
        logger.warning("%s has no explain signature: it serves, but cannot explain", path)
        return None
    fn = loaded.signatures[contract.EXPLAIN_SIGNATURE_KEY]
    contract.check_explain_signature(fn)
    # The same input, treated the same way as serving_default: the card's word holds too.
    contract.check_preprocessing(fn, contract.read_card(path))
    return fn


def _verify_card(path: Path) -> ModelCard:
    try:
        return contract.read_card(path)
    except FileNotFoundError as e:
        raise SavedModelContractError(
            f"model card missing. Received: {contract.card_path(path)}"
        ) from e
    except ValidationError as e:
        raise SavedModelContractError(f"model card invalid: {e}. Received: {path}") from e


def _verify_forward(fn: Any) -> None:
    size = contract.IMAGE_SIZE
    ramp = np.linspace(0, 2000, size * size, dtype=np.float32).reshape(1, size, size, 1)
    out = fn(**{contract.INPUT_NAME: tf.constant(ramp)})
    covid = out[contract.OUTPUT_COVID].numpy()
    probabilities = out[contract.OUTPUT_PROBABILITIES].numpy()
    if covid.shape != (1,) or probabilities.shape != (1, len(contract.CLASS_NAMES)):
        raise SavedModelContractError(
            f"one slice must give shapes (1,) and (1, 2). Received: {covid.shape}, "
            f"{probabilities.shape}"
        )
    ok = np.all(np.isfinite(probabilities)) and abs(float(probabilities.sum()) - 1) < 1e-4
    if not ok or covid[0] != probabilities[0, contract.COVID_CLASS]:
        raise SavedModelContractError(
            f"outputs must be finite probabilities summing to 1, covid = class "
            f"{contract.COVID_CLASS}. Received: probabilities={probabilities.tolist()}, "
            f"covid_probability={covid.tolist()}"
        )


# Explain's probabilities against serving_default's, one synthetic slice: the same network
# in another function (measured: equal to the last bit on this CPU; 1e-5 leaves room for
# other kernels).
EXPLAIN_AGREEMENT_ATOL = 1e-5


def _verify_explain(fn: Any, explain: Any) -> None:
    size = contract.IMAGE_SIZE
    ramp = np.linspace(0, 2000, size * size, dtype=np.float32).reshape(1, size, size, 1)
    served = fn(**{contract.INPUT_NAME: tf.constant(ramp)})
    out = explain(**{contract.INPUT_NAME: tf.constant(ramp)})
    heatmap = out[contract.OUTPUT_HEATMAP].numpy()
    empty = out[contract.OUTPUT_HEATMAP_EMPTY].numpy()
    if heatmap.shape != (1, size, size) or empty.shape != (1,):
        raise SavedModelContractError(
            f"explain of one slice must give a heatmap (1, {size}, {size}) and a flag (1,). "
            f"Received: {heatmap.shape}, {empty.shape}"
        )
    if not (np.all(np.isfinite(heatmap)) and heatmap.min() >= 0 and heatmap.max() <= 1):
        raise SavedModelContractError(
            f"the heatmap must be finite, in [0, 1]. Received: min {heatmap.min()}, "
            f"max {heatmap.max()}"
        )
    if bool(empty[0]) != (heatmap.max() == 0):
        raise SavedModelContractError(
            f"heatmap_empty must say whether the map is zero everywhere. Received: "
            f"heatmap_empty={bool(empty[0])}, max {heatmap.max()}"
        )
    for name in (contract.OUTPUT_PROBABILITIES, contract.OUTPUT_COVID):
        a, b = out[name].numpy(), served[name].numpy()
        if not np.allclose(a, b, rtol=0, atol=EXPLAIN_AGREEMENT_ATOL):
            raise SavedModelContractError(
                f"explain's '{name}' must equal serving_default's. Received: {a.tolist()} "
                f"and {b.tolist()}"
            )
