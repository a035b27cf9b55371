"""Model-randomisation sanity check of the Grad-CAM maps (Adebayo et al., "Sanity checks for
saliency maps", NeurIPS 2018): re-initialising the network from the top down (the heads,
then the FPN, then the conv5 stage) must change the maps, so that they depend on the
weights and are not an edge detector of the input.

"Re-initialised" layers take the weights of a second network built the same way with
another seed (random init, trained-like batch-norm statistics: the same distribution).
On real P002 slices read through app.ingest. The maps come from `models.explain`, the
code the export puts into the `explain` signature, here on the Keras network.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from app.ingest import IngestLimits, ingest_zip
from models.architecture import build_fpn_resnet50v2
from models.explain import EXPLAIN_LAYER, explain_keras
from shared_data import P002, needs_data, zip_files
from support import WIDE_HEAD_STD, give_trained_statistics

pytestmark = needs_data

SLICES = (40, 70, 85, 100)
HEADS = ("P3_dense", "P4_dense", "P5_dense", "P6_dense", "P7_dense", "classification")
FPN = ("C3_reduced", "C4_reduced", "C5_reduced", "P3", "P4", "P5", "P6", "P7")
# Measured Spearman ρ of each step's maps with the original ones, slices in order
# (EXPLAIN_LAYER = post_relu): heads −0.15, −0.11, 0.04, 0.04; + FPN 0.08, −0.02,
# −0.01, −0.17; + conv5 0.07, −0.12, 0.01, −0.08. The bar is the issue's: below 0.5.
MAX_RANK_CORRELATION = 0.5


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank (the maps have many equal zeros)."""
    flat = values.ravel()
    order = np.argsort(flat, kind="stable")
    ranks = np.empty(flat.size)
    ranks[order] = np.arange(flat.size)
    _, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:
            ranks[order[start : start + count]] = start + (count - 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def test_spearman_against_hand_values() -> None:
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1)
    # ties: ranks [0.5, 0.5, 2, 3] against [0, 1, 2, 3]: ρ = 0.9486832980505138
    assert spearman(np.array([0.0, 0, 1, 2]), np.array([0.0, 1, 2, 3])) == pytest.approx(
        0.9486832980505138
    )


@pytest.fixture(scope="module")
def p002() -> np.ndarray:
    archive = zip_files((f"P002/IM{i:04d}.dcm", P002 / f"IM{i:04d}.dcm") for i in SLICES)
    (series,) = ingest_zip(archive, IngestLimits()).series
    return series.pixels.astype(np.float32)[..., None]


def layer_names(model: keras.Model, prefixes: tuple[str, ...]) -> list[str]:
    return [layer.name for layer in model.layers if layer.name.startswith(prefixes)]


def test_randomising_the_top_of_the_network_changes_the_maps(p002: np.ndarray) -> None:
    model = give_trained_statistics(build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=0))
    other = give_trained_statistics(
        build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=1), seed=1
    )
    original = explain_keras(model, p002)
    assert not original["heatmap_empty"].any()
    assert np.ptp(original["covid_probability"]) > 0.1  # a network whose outputs vary
    # Not an edge detector to begin with: the maps against the input's gradient magnitude
    # (measured ρ 0.07, 0.07, 0.04, −0.06).
    gy, gx = np.gradient(p002[..., 0], axis=(1, 2))
    edges = np.hypot(gx, gy)
    for k in range(len(p002)):
        assert abs(spearman(original["heatmap"][k], edges[k])) < MAX_RANK_CORRELATION

    cascade = [
        ("heads", list(HEADS)),
        ("FPN", list(FPN)),
        ("conv5", layer_names(model, ("conv5_", "post_"))),
    ]
    randomised = keras.models.clone_model(model)
    randomised.set_weights(model.get_weights())
    for step, names in cascade:
        for name in names:
            layer = randomised.get_layer(name)
            if layer.weights:
                layer.set_weights(other.get_layer(name).get_weights())
        out = explain_keras(randomised, p002)
        assert not out["heatmap_empty"].any(), step  # else ρ would be undefined
        rho = [spearman(original["heatmap"][k], out["heatmap"][k]) for k in range(len(p002))]
        print(f"{EXPLAIN_LAYER} after re-initialising the {step}: rho {np.round(rho, 3)}")
        assert max(rho) < MAX_RANK_CORRELATION, (step, rho)
