"""Export to the service's SavedModel (models/export.py) and its check against app.contract."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from app import contract
from models import export
from models.__main__ import main
from models.architecture import build_fpn_resnet50v2
from models.export import (
    SavedModelContractError,
    directory_size,
    export_saved_model,
    untrained_card,
    verify_saved_model,
)
from support import WIDE_HEAD_STD, ct_like_slices, give_trained_statistics


@dataclass
class Exported:
    model: keras.Model
    path: Path
    loaded: Any  # keep alive while `fn` is used
    fn: Any
    save_s: float


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A seeded model with a wide head (outputs vary) and trained-like BN statistics (so the
    export's folding is really exercised), exported without the built-in check."""
    model = give_trained_statistics(build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=0))
    card = untrained_card(seed=0, head_init_std=WIDE_HEAD_STD, version="test-wide-head")
    path = tmp_path_factory.mktemp("export") / "seeded"
    started = time.perf_counter()
    export_saved_model(model, path, card, verify=False)
    save_s = time.perf_counter() - started
    loaded = verify_saved_model(path)
    return Exported(model, path, loaded, loaded.signatures[contract.SIGNATURE_KEY], save_s)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return ct_like_slices(3, seed=2)


def serve(fn: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    out = fn(**{contract.INPUT_NAME: tf.constant(x)})
    return {k: v.numpy() for k, v in out.items()}


def test_signature_keeps_the_contract(exported: Exported) -> None:
    args, kwargs = exported.fn.structured_input_signature
    assert args == ()
    spec = kwargs[contract.INPUT_NAME]
    assert spec.name == contract.INPUT_NAME == "slices"
    assert tuple(spec.shape.as_list()) == (None, 512, 512, 1) and spec.dtype == tf.float32
    outputs = exported.fn.structured_outputs
    assert {k: tuple(v.shape.as_list()) for k, v in outputs.items()} == {
        "covid_probability": (None,),
        "probabilities": (None, 2),
    }


def test_saved_model_matches_keras(exported: Exported, batch: np.ndarray) -> None:
    expected = exported.model.predict_on_batch(batch)
    # First: the outputs must vary, or agreement would prove nothing.
    assert np.ptp(expected[:, 0]) > 0.02, expected  # 2000× the tolerance below
    out = serve(exported.fn, batch)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["covid_probability"], out["probabilities"][:, 0])


def test_batch_of_one_matches_batch_of_three(exported: Exported, batch: np.ndarray) -> None:
    together = serve(exported.fn, batch)["covid_probability"]
    assert np.ptp(together) > 0.02, together
    alone = np.concatenate(
        [serve(exported.fn, batch[i : i + 1])["covid_probability"] for i in range(3)]
    )
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_card_states_use_limits_and_preprocessing(exported: Exported) -> None:
    """Mitchell et al. (2019): intended use, out-of-scope uses, limitations, data."""
    card = contract.read_card(exported.path)
    assert card.preprocessing == "none: raw stored values (HU + 1024)"
    assert "COVID-19" in card.intended_use and "adults" in card.intended_use
    assert card.out_of_scope_uses is not None
    out_of_scope = " ".join(card.out_of_scope_uses)
    for word in ("pneumonia", "Children", "Contrast"):
        assert word in out_of_scope
    assert card.limitations is not None and "community-acquired" in card.limitations[0]
    assert card.training_data and card.training_data.startswith("none")
    assert contract.short_form(card) == (card.intended_use, card.limitations[0])


def test_the_graph_takes_the_input_unscaled(exported: Exported) -> None:
    assert contract.input_preprocessing(exported.fn) == []


def test_card_says_untrained(exported: Exported) -> None:
    card = contract.read_card(exported.path)
    assert card.untrained and card.weights_source == "untrained"
    assert "NOT trained" in card.weights_detail and "meaningless" in card.weights_detail
    assert card.parameters == 34_058_656
    assert card.version == "test-wide-head"
    assert card.model_extra == {
        "seed": 0,
        "head_init_std": WIDE_HEAD_STD,
        "folded_batch_norms": 32,
        "fused_batch_norms": 17,
        "tensorflow_version": tf.__version__,
    }


def test_weights_are_stored_once(exported: Exported) -> None:
    size = directory_size(exported.path)
    assert 34_058_656 * 4 < size < 180e6, size  # twice would be about 272 MB
    print(f"export {size / 1e6:.1f} MB, saved in {exported.save_s:.1f} s")


def test_no_partial_directory_is_left(exported: Exported) -> None:
    assert [p.name for p in exported.path.parent.iterdir()] == ["seeded"]


def test_existing_directory_is_not_overwritten(exported: Exported) -> None:
    card = contract.read_card(exported.path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(exported.model, exported.path, card)


def test_failed_save_leaves_nothing(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export.tf.saved_model, "save", broken_save)
    card = contract.read_card(exported.path)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(exported.model, tmp_path / "out", card)
    assert list(tmp_path.iterdir()) == []


def test_publish_replaces_an_existing_export(tmp_path: Path) -> None:
    old, new = tmp_path / "default", tmp_path / ".default.partial-x"
    old.mkdir()
    (old / "v1").touch()
    new.mkdir()
    (new / "v2").touch()
    export._publish(new, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["default"]
    assert [p.name for p in old.iterdir()] == ["v2"]


def test_model_off_contract_is_refused() -> None:
    small = build_fpn_resnet50v2(input_size=96)
    with pytest.raises(ValueError, match=r"Received: model.input_shape=\(None, 96, 96, 1\)"):
        export.serving_module(small)


# --- verify_saved_model on broken exports ---------------------------------------------------


def _save_toy(
    path: Path,
    *,
    input_name: str = "slices",
    size: int = 512,
    outputs: tuple[str, ...] = ("covid_probability", "probabilities"),
    card: bool = True,
) -> Path:
    """A tiny SavedModel that is right or wrong in one chosen way."""
    spec = tf.TensorSpec([None, size, size, 1], tf.float32, name=input_name)

    def fn(x: tf.Tensor) -> dict[str, tf.Tensor]:
        p = tf.nn.softmax(tf.stack([tf.reduce_mean(x, [1, 2, 3]), tf.zeros(tf.shape(x)[:1])], 1))
        full = {"covid_probability": p[:, 0], "probabilities": p}
        return {k: full.get(k, p) for k in outputs}

    module = tf.Module()
    module.serve = tf.function(fn, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    if card:
        contract.write_card(path, untrained_card(seed=0, head_init_std=0.001))
    return path


def test_verify_accepts_a_toy_that_keeps_the_contract(tmp_path: Path) -> None:
    verify_saved_model(_save_toy(tmp_path / "ok"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "images"}, "must be exactly 'slices'"),
        ({"size": 256}, r"Received: float32 \(None, 256, 256, 1\)"),
        ({"outputs": ("probabilities",)}, "outputs must be"),
        ({"outputs": ("covid_probability", "probabilities", "logits")}, "outputs must be"),
        ({"card": False}, "model card missing"),
    ],
)
def test_verify_rejects_an_export_off_contract(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SavedModelContractError, match=message):
        verify_saved_model(_save_toy(tmp_path / "bad", **kwargs))


def test_verify_rejects_a_directory_that_is_no_saved_model(tmp_path: Path) -> None:
    with pytest.raises(SavedModelContractError, match=r"no saved_model\.pb"):
        verify_saved_model(tmp_path)


# --- preprocessing: the card and the graph must agree --------------------------------------------

PER_SLICE_MAX = "per-slice maximum: each slice divided by its own maximum"


def _tiny(*, normalise: bool) -> keras.Model:
    """A small network on the contract's input, with or without a per-slice max division."""
    slices = keras.Input((512, 512, 1), name="slices")
    x = slices
    if normalise:
        x = keras.layers.Lambda(
            lambda t: t / keras.ops.maximum(keras.ops.max(t, axis=(1, 2, 3), keepdims=True), 1.0)
        )(x)
    x = keras.layers.Conv2D(2, 16, strides=16, name="conv1_conv")(x)
    x = keras.layers.ReLU(name="post_relu")(x)  # the layers the explain signature reads
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(2, activation="softmax", name="classification")
    return keras.Model(slices, head(x))


def _card(preprocessing: str) -> contract.ModelCard:
    card = untrained_card(seed=0, head_init_std=0.001)
    return card.model_copy(update={"preprocessing": preprocessing})


@pytest.mark.parametrize(
    ("normalise", "preprocessing", "message"),
    [
        (True, "none", r"computes on 'slices' .* \['Max', 'Maximum', 'RealDiv'\]"),
        (False, "x / 4096", "hands 'slices' to its first convolution unchanged"),
    ],
)
def test_export_refuses_a_card_that_disagrees_with_the_graph(
    tmp_path: Path, normalise: bool, preprocessing: str, message: str
) -> None:
    with pytest.raises(SavedModelContractError, match=message):
        export_saved_model(_tiny(normalise=normalise), tmp_path / "out", _card(preprocessing))
    assert list(tmp_path.iterdir()) == []  # nothing published, nothing half-written


@pytest.mark.parametrize(("normalise", "preprocessing"), [(True, PER_SLICE_MAX), (False, "none")])
def test_export_accepts_a_card_that_agrees_with_the_graph(
    tmp_path: Path, normalise: bool, preprocessing: str
) -> None:
    out = export_saved_model(_tiny(normalise=normalise), tmp_path / "out", _card(preprocessing))
    assert contract.read_card(out).preprocessing == preprocessing


def test_a_card_without_preprocessing_is_refused(tmp_path: Path) -> None:
    path = _save_toy(tmp_path / "old", card=False)
    old = untrained_card(seed=0, head_init_std=0.001).model_copy(update={"preprocessing": None})
    contract.write_card(path, old)  # as cards were written before the field existed
    with pytest.raises(SavedModelContractError, match="does not state the input preprocessing"):
        verify_saved_model(path)


def test_shape_reads_and_a_network_without_convolution_count_as_no_preprocessing(
    tmp_path: Path,
) -> None:
    """The toy computes a mean of its input but has no weighted op: nothing precedes one."""
    loaded = tf.saved_model.load(str(_save_toy(tmp_path / "toy")))
    assert contract.input_preprocessing(loaded.signatures["serving_default"]) == []


# --- the command line ----------------------------------------------------------------------------


def test_cli_builds_the_untrained_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "default"
    assert main(["build-default", "--out", str(out)]) == 0
    assert "built UNTRAINED model" in capsys.readouterr().out
    card = contract.read_card(out)
    assert card.untrained and card.parameters == 34_058_656 and card.model_extra["seed"] == 0
    # The paper's head init: every slice scores about 0.5.
    loaded = tf.saved_model.load(str(out))
    p = serve(loaded.signatures[contract.SIGNATURE_KEY], ct_like_slices(2))
    np.testing.assert_allclose(p["covid_probability"], 0.5, atol=0.01)


def test_cli_skips_a_valid_export(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build-default", "--out", str(exported.path)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_cli_rebuilds_an_untrained_default_of_the_earlier_network(tmp_path: Path) -> None:
    """A default built before the input went unscaled: its card states no preprocessing."""
    out = _save_toy(tmp_path / "default", card=False)
    old = untrained_card(seed=0, head_init_std=0.001).model_copy(update={"preprocessing": None})
    contract.write_card(out, old)
    assert main(["build-default", "--out", str(out)]) == 0
    card = contract.read_card(out)
    assert card.preprocessing == contract.PREPROCESSING_NONE and card.parameters == 34_058_656


def test_cli_refuses_a_directory_without_card(tmp_path: Path) -> None:
    (tmp_path / "stray").touch()
    assert main(["build-default", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "stray").exists()
