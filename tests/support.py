"""Helpers for tests that run the real app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.settings import Settings

# With the paper's head init (std 0.001) every slice scores ≈ 0.5, which would make any
# comparison of outputs vacuous: output tests use this wider, seeded head. The logits scale
# with the square of the std (two dense layers): 0.05 still keeps every slice within
# 0.5 ± 0.006; 0.5 spreads them over about 0.5…0.9.
WIDE_HEAD_STD = 0.5


def make_settings(model_dir: Path, **overrides: object) -> Settings:
    """Settings for tests: no .env file, a small batch."""
    values: dict[str, object] = {"model_dir": model_dir, "max_batch_size": 4}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def wait_ready(client: TestClient, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/health")
        if r.status_code == 200:
            return
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.2)
    raise TimeoutError("model did not become ready")


def ct_like_slices(n: int, seed: int = 0) -> np.ndarray:
    """n different float32 [n, 512, 512, 1] slices in the stored-value domain (0…~3000)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    out = np.empty((n, 512, 512, 1), np.float32)
    for i in range(n):
        body = ((yy - 256) / rng.uniform(150, 220)) ** 2 + ((xx - 256) / 230) ** 2 < 1
        lung = ((yy - 280) / 90) ** 2 + ((np.abs(xx - 256) - 100) / rng.uniform(40, 80)) ** 2
        img = np.where(body, 1040.0, 0.0) + rng.normal(0, rng.uniform(10, 200), (512, 512))
        img = np.where(body & (lung < 1), rng.uniform(50, 400), img)
        out[i, ..., 0] = np.clip(img, 0, 3000)
    return out


def give_trained_statistics(model: Any, seed: int = 0) -> Any:
    """Give every BatchNormalization statistics like training leaves them; also γ, β, biases.

    An untrained BN is the identity up to 1/√(1 + ε): folding it would test almost
    nothing. Here γ, β and the conv biases are drawn at random, then one training-mode
    pass over CT-like slices (momentum 0) sets each moving mean and variance to what the
    layer really sees, so activations stay normalised, as in a trained network, instead
    of growing through the residual stream.
    """
    import keras  # only the models/ tests and the benchmark need it

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
