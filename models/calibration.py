"""Synthetic CT-like slices, and trained-like batch-norm statistics for untrained networks.

For the benchmark, the tests and `verify-import`: none of them may use patient data kept
in the repository, and an untrained network with Keras's initial batch-norm statistics
(mean 0, variance 1) lets activations grow through the residual stream, so its outputs say
little about a trained one's speed or numerics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The stored-value range `ct_like_slices` draws from (HU + 1024): air 0, soft tissue ~1040.
CT_LIKE_MAX = 3000.0


def ct_like_slices(n: int, seed: int = 0) -> np.ndarray:
    """n different float32 [n, 512, 512, 1] slices in the stored-value domain (0…3000).

    An elliptic body of soft tissue (~1040) with noise, two dark lung fields (50…400) in
    the paper's open-lung ROI, air (0) around; deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    out = np.empty((n, 512, 512, 1), np.float32)
    for i in range(n):
        body = ((yy - 256) / rng.uniform(150, 220)) ** 2 + ((xx - 256) / 230) ** 2 < 1
        lung = ((yy - 280) / 90) ** 2 + ((np.abs(xx - 256) - 100) / rng.uniform(40, 80)) ** 2
        img = np.where(body, 1040.0, 0.0) + rng.normal(0, rng.uniform(10, 200), (512, 512))
        img = np.where(body & (lung < 1), rng.uniform(50, 400), img)
        out[i, ..., 0] = np.clip(img, 0, CT_LIKE_MAX)
    return out


def give_trained_statistics(model: Any, seed: int = 0) -> Any:
    """Give every BatchNormalization statistics like training leaves them; also γ, β, biases.

    An untrained BN is the identity up to 1/√(1 + ε): folding it would test almost
    nothing. Here γ, β and the conv biases are drawn at random, then one training-mode
    pass over CT-like slices (momentum 0) sets each moving mean and variance to what the
    layer really sees, so activations stay normalised, as in a trained network, instead
    of growing through the residual stream. Keras 3 models (models.architecture).
    """
    import keras  # the tests and the benchmark need it; verify-import does not

    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.1, n).astype(np.float32))
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
    size = int(model.input_shape[1])
    crop = (512 - size) // 2
    slices = ct_like_slices(4, seed=seed)[:, crop : crop + size, crop : crop + size]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(slices, training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    return model
