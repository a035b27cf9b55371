"""Grad-CAM of the covid class, computed in the SavedModel's `explain` signature.

Selvaraju et al., "Grad-CAM: visual explanations from deep networks via gradient-based
localization" (ICCV 2017), as the paper's section 3.3 shows it:

    A   = the feature layer's activations           [N, h, w, C]   (EXPLAIN_LAYER)
    y   = the covid class's PRE-softmax score:      [N]
          the classification dense's input · its kernel[:, covid] + its bias[covid]
    α_c = mean over h, w of ∂y/∂A_c                 [N, C]          (pooled gradients)
    cam = ReLU(Σ_c α_c A_c)                         [N, h, w]
    heatmap = bilinear(cam, 512 × 512) / max        [N, 512, 512]  in [0, 1]

The final layer is dense(2, softmax): its logit is not a tensor of the Keras graph, so the
model is cut at the dense's input and the kernel and bias are applied here. A slice whose
map is zero everywhere (no positive evidence anywhere, or gradients that are all zero)
keeps a zero map and says so in `heatmap_empty` instead of dividing by zero.

The explain signature calls the very network `serving_default` calls (the export's
BN-folded copy, models/inference_graph.py), with the same input treated the same way; the
probabilities it returns come from the same graph. The backward pass runs from the score
down to the feature layer only, never into the backbone below it (its cost is measured in
benchmarks/bench_explain.py and docs/explain.md). `python -m models explain` draws the maps
offline: models/explain_offline.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from app import contract
from models.architecture import C5_LAYER, CLASSIFICATION_LAYER

# The feature layer, chosen by the model-randomisation sanity check (Adebayo et al. 2018;
# tests/models/test_explain_sanity.py) among C5 and the pyramid levels. Run on four P002
# slices for C5, C5_reduced, P3, P4 and P5, each on the seeded network and after
# re-initialising its heads, + FPN, + conv5, + conv4 (20 maps per layer):
# - only C5 and C5_reduced never gave an empty map; P4's was empty on 2 of the 4 original
#   slices and P5's on 1 (one head's ReLU shut), so their rank correlation with the
#   randomised maps is not even defined. Where defined, every layer's stayed below 0.2
#   (bar 0.5), and below 0.1 against the input's edges;
# - C5 (`post_relu`, 16 × 16 × 2048, stride 32) is the last layer every head reads from
#   (P5, P6 → P7 and, through C5_reduced, P4 and P3), where one pyramid level carries one
#   head's evidence (P3's map ignores the P4…P7 heads);
# - its grid lines up with the input exactly (16 × 32 = 512), where the valid 3 × 3 of
#   P3 (30 × 30) and P4 (14 × 14) trims a cell at each border, so their maps would sit
#   slightly off when stretched to 512 × 512.
EXPLAIN_LAYER = C5_LAYER

Explain = Callable[[tf.Tensor], dict[str, tf.Tensor]]


def explain_parts(model: keras.Model, layer: str = EXPLAIN_LAYER) -> keras.Model:
    """The same network, with outputs [the feature layer, the classification dense's
    input, the probabilities]: every layer shared, so every weight is the model's own."""
    for name in (layer, CLASSIFICATION_LAYER):
        try:
            model.get_layer(name)
        except ValueError as e:
            raise ValueError(
                f"Grad-CAM needs the layer '{name}'. Received: a model without it ({model.name})"
            ) from e
    head = model.get_layer(CLASSIFICATION_LAYER)
    outputs = [model.get_layer(layer).output, head.input, model.output]
    return keras.Model(model.input, outputs, name=f"{model.name}_explain")


def covid_logit(head_input: tf.Tensor, head: keras.layers.Dense) -> tf.Tensor:
    """The covid class's pre-softmax score [N]: what the classification dense computes
    before its softmax, for column COVID_CLASS."""
    kernel = tf.convert_to_tensor(head.kernel)[:, contract.COVID_CLASS]
    bias = tf.convert_to_tensor(head.bias)[contract.COVID_CLASS] if head.use_bias else 0.0
    return tf.linalg.matvec(head_input, kernel) + bias


def grad_cam(features: tf.Tensor, gradients: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(heatmap [N, 512, 512] in [0, 1], empty [N] bool) from the feature layer's
    activations and the score's gradient with respect to them (both [N, h, w, C])."""
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # α: [N, 1, 1, C]
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    size = (contract.IMAGE_SIZE, contract.IMAGE_SIZE)
    cam = tf.image.resize(cam, size, method="bilinear")[..., 0]  # half-pixel centres
    peak = tf.reduce_max(cam, axis=(1, 2))
    heatmap = tf.math.divide_no_nan(cam, peak[:, None, None])  # a zero map stays zero
    return tf.clip_by_value(heatmap, 0.0, 1.0), peak <= 0.0


def make_explain(model: keras.Model, layer: str = EXPLAIN_LAYER) -> Explain:
    """slices float32 [N, 512, 512, 1] → the explain signature's outputs (app.contract)."""
    parts = explain_parts(model, layer)
    head = model.get_layer(CLASSIFICATION_LAYER)

    def explain(slices: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            features, head_input, probabilities = parts(slices, training=False)
            tape.watch(features)
            # The slices of a batch are independent (inference-mode BN, no op across
            # slices), so the gradient of the sum is each slice's own gradient.
            total = tf.reduce_sum(covid_logit(head_input, head))
        gradients = tape.gradient(total, features)
        heatmap, empty = grad_cam(features, gradients)
        return {
            contract.OUTPUT_COVID: probabilities[:, contract.COVID_CLASS],
            contract.OUTPUT_PROBABILITIES: probabilities,
            contract.OUTPUT_HEATMAP: heatmap,
            contract.OUTPUT_HEATMAP_EMPTY: empty,
        }

    return explain


def explain_keras(model: keras.Model, slices: Any, layer: str = EXPLAIN_LAYER) -> dict[str, Any]:
    """The explain outputs of a Keras model, as NumPy arrays (eager; for checks and tests)."""
    out = make_explain(model, layer)(tf.constant(slices, tf.float32))
    return {k: v.numpy() for k, v in out.items()}
