"""models.data: COVID-CTset's layouts on disk (fold CSVs, class folders, raw patient folders).

No TensorFlow here: the tf.data pipeline is exercised by test_train.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from models import data as datasets


def write_tiff(path: Path, value: int = 1000, dtype: type = np.uint16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((512, 512), value, dtype))


@pytest.fixture
def fold_layout(tmp_path: Path) -> Path:
    """CSV/{train,validation,test}1.csv over data/, and the same slices in class folders."""
    rows = {"train": [("covid0.tif", "covid"), ("normal1.tif", "Normal")]}
    rows["validation"] = [("covid2.tif", "COVID"), ("normal3.tif", "normal")]
    rows["test"] = rows["validation"]
    (tmp_path / "CSV").mkdir()
    for split, entries in rows.items():
        with open(tmp_path / "CSV" / f"{split}1.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "class"), *entries])
        for name, label in entries:
            write_tiff(tmp_path / "data" / name)
            folder = "train" if split == "train" else "val"
            write_tiff(tmp_path / folder / label.lower() / name)
    return tmp_path


def test_both_training_layouts_read_the_same_slices(fold_layout):
    fold = datasets.fold_data(fold_layout / "CSV", fold_layout / "data", 1)
    folders = datasets.folder_data(fold_layout / "train", fold_layout / "val")
    assert [(s.path.name, s.label) for s in fold.train] == [("covid0.tif", 0), ("normal1.tif", 1)]
    assert sorted((s.path.name, s.label) for s in folders.train) == [
        ("covid0.tif", 0),
        ("normal1.tif", 1),
    ]
    assert [s.label for s in fold.validation] == [0, 1]
    assert fold.fold == 1 and folders.fold is None
    assert "train1.csv (1 covid, 1 normal slices)" in fold.description
    assert "validation1.csv (1 covid, 1 normal slices)" in fold.description


def test_missing_fold_images_are_refused(fold_layout, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(datasets.DatasetError, match="2 of 2 images"):
        datasets.read_fold_csv(fold_layout / "CSV" / "test1.csv", empty)
    with pytest.raises(datasets.DatasetError, match=r"no train2\.csv"):
        datasets.fold_csv(fold_layout / "CSV", "train", 2)


def test_an_unknown_class_is_refused(tmp_path):
    write_tiff(tmp_path / "data" / "a.tif")
    (tmp_path / "test1.csv").write_text("filename,class\na.tif,pneumonia\n")
    with pytest.raises(datasets.DatasetError, match="unknown class on line 2"):
        datasets.read_fold_csv(tmp_path / "test1.csv", tmp_path / "data")


@pytest.fixture
def patients_root(tmp_path: Path) -> Path:
    for patient in ("P2", "P10", "P9"):
        for series in ("SR_10", "SR_2"):
            for i in (1, 2):
                write_tiff(tmp_path / "COVID" / patient / series / f"IM{i}.tif")
    write_tiff(tmp_path / "normal" / "N3" / "IM1.tif")  # a patient folder that is one series
    (tmp_path / "normal" / "N4").mkdir()  # no TIFF: skipped
    (tmp_path / "notes").mkdir()  # not a class folder: skipped
    return tmp_path


def test_patients_and_series_come_in_natural_order(patients_root):
    patients = datasets.find_patients(patients_root)
    assert [p.patient for p in patients] == ["COVID/P2", "COVID/P9", "COVID/P10", "normal/N3"]
    assert [s.name for s in patients[0].series] == ["SR_2", "SR_10"]
    assert patients[3].series == (patients_root / "normal" / "N3",)


def test_a_patient_list_keeps_only_the_listed_patients(patients_root):
    folders = datasets.find_patients(patients_root)
    kept = datasets.keep_patients(folders, ["# fold 1 test patients", "P10", "N3", ""])
    assert [p.patient for p in kept] == ["COVID/P10", "normal/N3"]
    with pytest.raises(datasets.DatasetError, match="1 listed patients have no folder"):
        datasets.keep_patients(folders, ["P2", "P7"])


def test_a_series_is_read_in_natural_file_order(tmp_path):
    for i in (10, 9, 1):
        write_tiff(tmp_path / f"IM{i}.tif", value=i)
    stack = datasets.read_series(tmp_path)
    assert stack.dtype == np.uint16 and stack[:, 0, 0].tolist() == [1, 9, 10]


@pytest.mark.parametrize("reader", [datasets.read_series, datasets.read_slice])
def test_float_tiffs_are_refused(tmp_path, reader):
    """A TIFF normalised to [0, 1] has lost the raw values the network takes."""
    write_tiff(tmp_path / "IM1.tif", value=0, dtype=np.float32)
    target = tmp_path if reader is datasets.read_series else tmp_path / "IM1.tif"
    with pytest.raises(datasets.DatasetError, match="raw integer"):
        reader(target)


def test_a_slice_is_read_unscaled(tmp_path):
    image = np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 4096
    tifffile.imwrite(tmp_path / "IM1.tif", image.astype(np.uint16))
    read = datasets.read_slice(tmp_path / "IM1.tif")
    assert read.dtype == np.float32 and np.array_equal(read, image.astype(np.float32))


def test_batches_stack_with_a_channel_axis():
    images = [np.full((512, 512), i, np.uint16) for i in range(5)]
    batches = list(datasets.as_batches(images, 2))
    assert [b.shape for b in batches] == [(2, 512, 512, 1), (2, 512, 512, 1), (1, 512, 512, 1)]
    assert batches[0].dtype == np.float32 and batches[2][0, 0, 0, 0] == 4
