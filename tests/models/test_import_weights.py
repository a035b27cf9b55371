"""models.import_weights and models.transfer: Keras 2 HDF5 files into the architecture.

The HDF5 files are written here with h5py (tests/models/keras2_h5.py), in the layout
Keras 2.3 gave the authors' ModelCheckpoint files. The layers the paper's code left
unnamed carry Keras 2's automatic names (dense_1 … dense_6, flatten_1, concatenate_1 …),
listed in an order that is not their creation order. test_keras2_files.py imports files
written by Keras 2 itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from app import contract
from keras2_h5 import HEADS, write_keras2_h5
from models.architecture import CLASSIFICATION_LAYER, PYRAMID_LEVELS, build_fpn_resnet50v2
from models.import_weights import (
    H5Layer,
    WeightImportError,
    import_weights,
    plan_import,
    read_keras2_h5,
)
from models.transfer import FIRST_CONV, FROM_SCRATCH, initialise_backbone, transfer_imagenet
from support import WIDE_HEAD_STD

# Our name → the name Keras 2 gave the paper's unnamed layer (heads in creation order).
KERAS2_NAMES = {
    **{head: f"dense_{i}" for i, head in enumerate(HEADS, start=1)},
    **{f"{lv}_flatten": f"flatten_{i}" for i, lv in enumerate(PYRAMID_LEVELS, start=1)},
    **{f"{lv}_dropout": f"dropout_{i}" for i, lv in enumerate(PYRAMID_LEVELS, start=1)},
    "P4_merged": "concatenate_1",
    "P3_merged": "concatenate_2",
    "heads_concat": "concatenate_3",
    "P6_relu": "C6_relu",
    "slices": "input_1",
}


def varied_batch() -> np.ndarray:
    """Two different CT-like slices in stored values."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:512, :512]
    body = ((x - 256) / 200) ** 2 + ((y - 256) / 160) ** 2 < 1
    first = np.where(body, 1040.0, 0.0) + rng.normal(0, 30, (512, 512))
    second = np.roll(first, 60, axis=1) * 0.7 + rng.uniform(0, 600, (512, 512))
    return np.clip(np.stack([first, second]), 0, 4000).astype(np.float32)[..., None]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    """A network with varied outputs, written as the authors' FPN-fold1.hdf5."""
    model = build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=11)
    path = tmp_path_factory.mktemp("h5") / "FPN-fold1.hdf5"
    # The backbone's variables scoped as in the authors' files: the second ResNet50V2.
    write_keras2_h5(path, model, rename=KERAS2_NAMES, scope_suffix="_1")
    return model, path


def test_import_round_trip_gives_the_source_outputs(source, tmp_path):
    model, path = source
    out = import_weights(path, tmp_path / "imported")

    batch = varied_batch()
    expected = model(batch, training=False).numpy()
    assert abs(expected[0, 0] - expected[1, 0]) > 1e-3, "outputs must vary with the input"
    loaded = tf.saved_model.load(str(out))
    served = loaded.signatures[contract.SIGNATURE_KEY](slices=tf.constant(batch))
    np.testing.assert_allclose(served[contract.OUTPUT_PROBABILITIES].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(served[contract.OUTPUT_COVID].numpy(), expected[:, 0], atol=1e-5)

    card = contract.read_card(out)
    assert card.weights_source == "imported"
    assert card.fold == 1
    assert "FPN-fold1.hdf5" in card.weights_detail
    assert card.model_extra["source_file"] == "FPN-fold1.hdf5"
    assert len(card.model_extra["source_sha256"]) == 64
    assert card.parameters == model.count_params()


def test_auto_named_layers_map_by_creation_order(source):
    model, path = source
    pairs = {ours.name: h5.name for ours, h5 in plan_import(model, read_keras2_h5(path))}
    assert [pairs[h] for h in HEADS] == [f"dense_{i}" for i in range(1, 7)]
    assert pairs["P3"] == "P3" and pairs["post_bn"] == "post_bn"


def test_tf_keras_names_start_without_a_number(source):
    model, _ = source
    layers = read_keras2_h5(source[1])
    renamed = {}
    for name, layer in layers.items():
        if name.startswith("dense_"):
            number = int(name.split("_")[1]) - 1  # tf.keras: dense, dense_1 … dense_5
            name = "dense" if number == 0 else f"dense_{number}"
        renamed[name] = dataclasses.replace(layer, name=name)
    pairs = {ours.name: h5.name for ours, h5 in plan_import(model, renamed)}
    assert pairs[HEADS[0]] == "dense" and pairs[CLASSIFICATION_LAYER] == "dense_5"


def _mutated(path: Path, **changes) -> dict[str, H5Layer]:
    layers = dict(read_keras2_h5(path))
    for name, value in changes.items():
        if value is None:
            del layers[name]
        else:
            layers[name] = value
    return layers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "shape",
            r"file layer dense_3 → P5_dense: kernel has shape \(65537, 2\), ours \(65536, 2\)",
        ),
        ("rgb_conv1", r"conv1_conv: kernel has shape \(7, 7, 3, 64\), ours \(7, 7, 1, 64\)"),
        ("missing", r"missing: no weights in the file for our layer P4\b"),
        ("missing_head", r"missing: no weights in the file for our layer classification"),
        ("extra", r"extra: file layer dense_7 has no place"),
        ("unknown", r"extra: file layer box_regression has no place"),
        ("weight_count", r"file layer P5: 1 weights"),
    ],
)
def test_anything_that_does_not_fit_is_refused(source, change, message):
    model, path = source
    layers = read_keras2_h5(path)
    dense3, conv1, p5 = layers["dense_3"], layers["conv1_conv"], layers["P5"]
    changes = {
        "shape": {
            "dense_3": dataclasses.replace(dense3, arrays=(np.zeros((65537, 2)), dense3.arrays[1]))
        },
        "rgb_conv1": {
            "conv1_conv": dataclasses.replace(
                conv1, arrays=(np.zeros((7, 7, 3, 64)), conv1.arrays[1])
            )
        },
        "missing": {"P4": None},
        "missing_head": {"dense_6": None},
        "extra": {"dense_7": dataclasses.replace(dense3, name="dense_7")},
        "unknown": {"box_regression": dataclasses.replace(p5, name="box_regression")},
        "weight_count": {
            "P5": dataclasses.replace(p5, weight_names=p5.weight_names[:1], arrays=p5.arrays[:1])
        },
    }[change]
    before = model.get_layer("P5_dense").kernel.numpy().copy()
    with pytest.raises(WeightImportError, match=message):
        plan_import(model, _mutated(path, **changes))
    np.testing.assert_array_equal(model.get_layer("P5_dense").kernel.numpy(), before)


# --- ImageNet transfer ---------------------------------------------------------------------------


def test_imagenet_transfer_fills_every_backbone_layer_but_the_first_conv(source, tmp_path):
    import keras

    # Keras's notop file: ResNet50V2 on RGB, weights only (layer_names at the root).
    rgb = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras2_h5(path, rgb, whole_model=False)
    model = source[0]
    original = model.get_weights()
    conv1, p3 = (model.get_layer(n).kernel.numpy().copy() for n in (FIRST_CONV, "P3"))
    try:
        transfer = transfer_imagenet(model, path)
        copied = {
            n: [np.asarray(w) for w in model.get_layer(n).weights]
            for n in ("conv2_block1_1_conv", "conv4_block6_3_conv", "post_bn")
        }
        kept = [model.get_layer(n).kernel.numpy() for n in (FIRST_CONV, "P3")]
    finally:
        model.set_weights(original)  # the module's other tests compare against the source

    with_weights = [layer for layer in rgb.layers if layer.weights]
    assert transfer.layers == len(with_weights) - 1 and transfer.skipped == (FIRST_CONV,)
    for name, weights in copied.items():
        for ours, theirs in zip(weights, rgb.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(ours, np.asarray(theirs))
    np.testing.assert_array_equal(kept[0], conv1)
    np.testing.assert_array_equal(kept[1], p3)
    assert "ImageNet ResNet50V2 weights" in transfer.describe()


def test_without_imagenet_weights_training_starts_from_scratch(source, tmp_path, caplog):
    model = source[0]
    assert initialise_backbone(model, None).describe() == FROM_SCRATCH
    assert FROM_SCRATCH in caplog.text
    with pytest.raises(FileNotFoundError, match="ImageNet weights file not found"):
        initialise_backbone(model, tmp_path / "absent.h5")
    fpn_only = tmp_path / "fpn.h5"
    write_keras2_h5(fpn_only, model, skip={FIRST_CONV})
    with pytest.raises(WeightImportError, match="not a ResNet50V2 file"):
        transfer_imagenet(model, fpn_only)
