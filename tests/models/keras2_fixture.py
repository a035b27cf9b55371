"""Build the authors' file format for real: run as a script, in a process of its own.

    python tests/models/keras2_fixture.py OUT_DIR SLICES.npy

Builds the authors' network under Keras 2 (models/keras2_reference.py, tf-keras in graph
mode, as Keras 2.3 ran), compiles it as they did, takes one training step (so the Nadam
state exists, as in their ModelCheckpoint files), gives it varied weights, and writes to
OUT_DIR:
- FPN-fold1.hdf5          `model.save` (architecture, weights, optimizer state)
- FPN-fold1-weights.hdf5  `model.save_weights`
- expected.npy            the Keras 2 model's softmax outputs [N, 2] on SLICES.npy

Varied weights: trained-like batch-norm statistics (each BN's moving mean and variance are
the statistics of what it sees in one training-mode pass over the slices: the same
activations as calibrating layer by layer), random γ, β and biases, and heads sized on
the slices so that the covid logits spread (standard deviation 1.5 around 0) instead of
sitting at 0.5 (the paper's init) or saturating at 0 or 1. Never committed: the test
builds it in a temporary folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.keras2_reference import _keras2, build_network, compile_as_the_authors  # noqa: E402

SEED = 7
LOGIT_SPREAD = 1.5  # std of the covid logit over the slices


def _run(model: Any, fetches: Any, slices: np.ndarray, *, training: bool) -> Any:
    """One session run of the graph (Keras 2.3 style), in training or inference mode."""
    from tf_keras.src.backend import get_session, learning_phase

    feed = {model.input: slices, learning_phase(): training}
    return get_session().run(fetches, feed_dict=feed)


def _vary(keras: Any, model: Any, slices: np.ndarray, rng: np.random.Generator) -> None:
    """Varied weights, set in three batches (one graph run each: a graph-mode session
    builds an executor per distinct run, so per-layer `set_weights` takes minutes)."""
    import tensorflow as tf

    set_value = keras.backend.batch_set_value
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    values = []
    for layer in norms:
        n = layer.gamma.shape[0]
        values += [(layer.gamma, rng.uniform(0.8, 1.2, n)), (layer.beta, rng.normal(0, 0.1, n))]
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            values.append((layer.bias, rng.normal(0, 0.05, layer.bias.shape)))
    set_value(values)
    moments = [tf.nn.moments(layer.input, axes=[0, 1, 2]) for layer in norms]
    statistics = _run(model, moments, slices, training=True)
    set_value(
        [(layer.moving_mean, mean) for layer, (mean, _) in zip(norms, statistics, strict=True)]
        + [(layer.moving_variance, var) for layer, (_, var) in zip(norms, statistics, strict=True)]
    )
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    heads, final = dense[:5], dense[5]
    values, features = [], []
    for layer, x in zip(heads, _run(model, [d.input for d in heads], slices, training=False),
                        strict=True):  # fmt: skip
        kernel = rng.normal(0, 1 / np.sqrt(x.shape[1]), (x.shape[1], 2)) / max(x.std(), 1e-6)
        z = x @ kernel
        bias = -z.mean(axis=0) + 0.5 * z.std(axis=0)  # mostly positive: the relu passes
        values += [(layer.kernel, kernel), (layer.bias, bias)]
        features.append(np.maximum(z + bias, 0))
    concat = np.concatenate(features, axis=1)
    kernel = rng.normal(0, 1, (10, 2))
    logit = concat @ (kernel[:, 0] - kernel[:, 1])
    kernel *= LOGIT_SPREAD / max(logit.std(), 1e-6)
    logit = concat @ (kernel[:, 0] - kernel[:, 1])
    values += [(final.kernel, kernel), (final.bias, np.array([-logit.mean(), 0.0]))]
    set_value(values)


def _log(started: float, what: str) -> None:
    print(f"keras2_fixture: {what} after {time.perf_counter() - started:.1f} s", file=sys.stderr)


def main(out_dir: Path, slices_path: Path) -> None:
    started = time.perf_counter()
    keras = _keras2()
    keras.utils.set_random_seed(SEED)  # the backbone's initial kernels too
    slices = np.load(slices_path).astype(np.float32)
    rng = np.random.default_rng(SEED)
    model = build_network(keras)
    compile_as_the_authors(keras, model)
    _log(started, "built")
    labels = np.eye(2, dtype=np.float32)[[0]]
    model.train_on_batch(slices[:1], labels)  # the optimizer's state, as a checkpoint has it
    _log(started, "one training step")
    _vary(keras, model, slices, rng)
    _log(started, "varied")
    expected = model.predict(slices, batch_size=4, verbose=0)
    _log(started, "predicted")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir / "FPN-fold1.hdf5"), save_format="h5")
    model.save_weights(str(out_dir / "FPN-fold1-weights.hdf5"), save_format="h5")
    np.save(out_dir / "expected.npy", expected)
    _log(started, "saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
