"""The SavedModel's `explain` signature (models/explain.py, models/export.py).

The proof that it computes Grad-CAM: its maps equal an independent computation on the
unfolded Keras network (a `tf.GradientTape` through a copy whose final softmax is swapped
for the identity, then pooling, ReLU, bilinear resize and normalisation in NumPy float64),
on real P002 slices read through app.ingest, with a network whose outputs vary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from app import contract
from app.ingest import IngestLimits, ingest_zip
from models.architecture import C5_LAYER, build_fpn_resnet50v2
from models.explain import EXPLAIN_LAYER, explain_parts, grad_cam
from models.export import (
    SavedModelContractError,
    export_saved_model,
    untrained_card,
    verify_saved_model,
)
from shared_data import P002, needs_data, zip_files
from support import WIDE_HEAD_STD, give_trained_statistics

SLICES = (40, 70, 85, 100)  # P002, open lung, marked infected by the radiologists


@dataclass
class Exported:
    model: keras.Model  # the unfolded Keras network
    path: Path
    loaded: Any  # keep alive while the signatures are used
    explain: Any
    serve: Any


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Wide head (outputs vary) and trained-like BN statistics (so the export's folding is
    really exercised: the signature runs the folded copy, the reference the original)."""
    model = give_trained_statistics(build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=0))
    path = tmp_path_factory.mktemp("explain") / "model"
    export_saved_model(model, path, untrained_card(seed=0, head_init_std=WIDE_HEAD_STD))
    loaded = tf.saved_model.load(str(path))
    sigs = loaded.signatures
    return Exported(
        model, path, loaded, sigs[contract.EXPLAIN_SIGNATURE_KEY], sigs[contract.SIGNATURE_KEY]
    )


@pytest.fixture(scope="module")
def p002() -> np.ndarray:
    """float32 [4, 512, 512, 1] stored values of four P002 slices, through app.ingest."""
    archive = zip_files((f"P002/IM{i:04d}.dcm", P002 / f"IM{i:04d}.dcm") for i in SLICES)
    (series,) = ingest_zip(archive, IngestLimits()).series
    return series.pixels.astype(np.float32)[..., None]


def call(fn: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in fn(**{contract.INPUT_NAME: tf.constant(x)}).items()}


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of a bilinear resize with half-pixel centres, edges clamped
    (written here from the definition, not taken from TensorFlow)."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        weights[i, lo] += 1 - (src - lo)
        weights[i, hi] += src - lo
    return weights


def reference_grad_cam(model: keras.Model, x: np.ndarray, layer: str) -> np.ndarray:
    """Grad-CAM of the covid logit, by hand, on a copy of the unfolded network."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.get_layer("classification").activation = keras.activations.linear  # logits out
    cut = keras.Model(copy.input, [copy.get_layer(layer).output, copy.output])
    with tf.GradientTape() as tape:
        features, logits = cut(tf.constant(x), training=False)
        covid = logits[:, contract.COVID_CLASS]
    grads = tape.gradient(covid, features).numpy().astype(np.float64)
    a = features.numpy().astype(np.float64)
    cam = np.maximum(np.einsum("nhwc,nc->nhw", a, grads.mean(axis=(1, 2))), 0)
    rows = bilinear_matrix(cam.shape[1], 512)
    cols = bilinear_matrix(cam.shape[2], 512)
    up = np.einsum("ih,nhw,jw->nij", rows, cam, cols)
    peak = up.max(axis=(1, 2), keepdims=True)
    assert np.all(peak > 0), "a reference map is empty: the comparison would be vacuous"
    maps: np.ndarray = up / peak
    return maps


@needs_data
def test_signature_maps_equal_an_independent_grad_cam(exported: Exported, p002: np.ndarray) -> None:
    out = call(exported.explain, p002)
    covid = out[contract.OUTPUT_COVID]
    # First: the outputs must vary, or the maps of a flat network would prove little.
    assert np.ptp(covid) > 0.1, covid  # measured 0.338…0.569
    expected = reference_grad_cam(exported.model, p002, EXPLAIN_LAYER)
    heatmap = out[contract.OUTPUT_HEATMAP]
    assert heatmap.shape == (len(SLICES), 512, 512) and heatmap.dtype == np.float32
    assert not out[contract.OUTPUT_HEATMAP_EMPTY].any()
    # Measured max |difference| 2.8e-5 (the folded graph against the unfolded network,
    # float32 against float64), for maps spread over 0…1.
    np.testing.assert_allclose(heatmap, expected, rtol=0, atol=1e-4)
    assert heatmap.max(axis=(1, 2)).tolist() == [1.0] * len(SLICES)
    assert np.ptp(expected, axis=(1, 2)).min() > 0.5  # maps, not constants


@needs_data
def test_explain_scores_as_serving_default_does(exported: Exported, p002: np.ndarray) -> None:
    explained, served = call(exported.explain, p002), call(exported.serve, p002)
    for name in (contract.OUTPUT_PROBABILITIES, contract.OUTPUT_COVID):
        # The same graph in another function: measured equal to the last bit.
        np.testing.assert_allclose(explained[name], served[name], rtol=0, atol=1e-6)


def test_the_signature_keeps_the_contract(exported: Exported) -> None:
    contract.check_explain_signature(exported.explain)
    assert contract.input_preprocessing(exported.explain) == []  # raw values, as serving
    with pytest.raises(contract.ContractError, match="outputs must be"):
        contract.check_explain_signature(exported.serve)
    verify_saved_model(exported.path, require_explain=True)


def test_an_all_zero_map_stays_zero_and_says_so() -> None:
    features = tf.constant(np.ones((2, 16, 16, 3), np.float32))
    gradients = np.zeros((2, 16, 16, 3), np.float32)
    gradients[1] = -1.0  # only negative evidence: ReLU leaves nothing
    gradients[0, 3, 4, 1] = 256.0  # one positive channel weight: a flat positive map
    heatmap, empty = (t.numpy() for t in grad_cam(features, tf.constant(gradients)))
    assert empty.tolist() == [False, True]
    assert np.all(np.isfinite(heatmap))
    np.testing.assert_array_equal(heatmap[1], 0.0)
    np.testing.assert_allclose(heatmap[0], 1.0)


def test_a_network_without_the_layers_is_refused() -> None:
    inputs = keras.Input((8, 8, 1))
    toy = keras.Model(inputs, keras.layers.Dense(2, name="other")(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match=f"needs the layer '{C5_LAYER}'"):
        explain_parts(toy)


def _save_without_explain(path: Path) -> Path:
    spec = tf.TensorSpec([None, 512, 512, 1], tf.float32, name="slices")

    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        p = tf.nn.softmax(tf.stack([tf.reduce_mean(x, [1, 2, 3]), tf.zeros(tf.shape(x)[:1])], 1))
        return {contract.OUTPUT_COVID: p[:, 0], contract.OUTPUT_PROBABILITIES: p}

    module = tf.Module()
    module.serve = tf.function(serve, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={contract.SIGNATURE_KEY: module.serve})
    contract.write_card(path, untrained_card(seed=0, head_init_std=0.001))
    return path


def test_verify_requires_explain_of_an_export_only(tmp_path: Path) -> None:
    path = _save_without_explain(tmp_path / "old")
    verify_saved_model(path)  # an older export still verifies (and serves)
    with pytest.raises(SavedModelContractError, match="lacks signature 'explain'"):
        verify_saved_model(path, require_explain=True)
