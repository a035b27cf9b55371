"""models.covid_ct_md: COVID-CT-MD's layouts on disk (the published one, and the shared one).

Expected labels come from the shared CSV (keyed by file name); the published layout is
built from it in a temporary folder (covid_ct_md_layout.py), with its label row in
ascending slice position: reading it back by file name checks the ordering.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covid_ct_md_layout import PADDED_TO, build_published_layout, link_folder, p002_labels
from models import covid_ct_md
from models.data import DatasetError
from shared_data import DATA, NORMAL002, P002, needs_data


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_layout(tmp_path_factory.mktemp("covid-ct-md") / "COVID-CT-MD")


@needs_data
def test_the_published_layout_gives_the_radiologists_labels(published, caplog):
    patients = {p.patient: p for p in covid_ct_md.read_covid_ct_md(published)}
    assert list(patients) == ["normal002", "P002"]
    p002, normal = patients["P002"], patients["normal002"]
    assert (p002.diagnosis, p002.label, p002.folder.name) == ("covid", 0, "P002")
    # Index.csv skips Label Index 1 and has two rows for a two-row array: P002 is row 1.
    assert p002.label_source == "Slice-level-labels.npy row 1"
    assert p002.slice_labels == p002_labels()
    assert sum(p002.slice_labels.values()) == 68  # as the shared data's README says
    assert (normal.diagnosis, normal.label) == ("normal", 1)
    assert normal.slice_labels == {p.name: 0 for p in NORMAL002.glob("*.dcm")}
    assert "1 patients of Index.csv have no folder here" in caplog.text  # P001


@needs_data
def test_the_shared_layout_gives_the_same_labels(published):
    shared = {p.patient: p for p in covid_ct_md.read_covid_ct_md(DATA / "covid-ct-md")}
    assert shared["P002"].slice_labels == p002_labels()
    assert shared["P002"].label_source == "P002-slice-labels.csv"
    assert shared["normal002"].diagnosis == "normal"  # from its ID, not the root's name
    assert covid_ct_md.describe(list(shared.values())) == (
        "2 patients (1 covid, 1 normal); 1 COVID-19 with radiologists' slice labels; 0 CAP left out"
    )


@needs_data
def test_cap_patients_are_left_out(tmp_path):
    link_folder(P002, tmp_path / "CAP Cases" / "cap001")
    link_folder(NORMAL002, tmp_path / "Normal Cases" / "normal002")
    patients = covid_ct_md.read_covid_ct_md(tmp_path)
    cap = next(p for p in patients if p.patient == "cap001")
    assert (cap.diagnosis, cap.label, cap.slice_labels) == ("cap", None, None)
    assert covid_ct_md.describe(patients).endswith("1 CAP left out")


@needs_data
def test_a_label_row_that_does_not_fit_is_refused(published, tmp_path):
    rows = np.load(published / "Slice-level-labels.npy")
    short = tmp_path / "short.npy"
    np.save(short, rows[:, :100])  # P002 has 133 slices
    with pytest.raises(DatasetError, match="do not fit its 133 DICOM files"):
        covid_ct_md.read_covid_ct_md(published, labels_file=short)
    past_end = rows.copy()
    past_end[1, PADDED_TO - 1] = 1
    np.save(tmp_path / "past-end.npy", past_end)
    with pytest.raises(DatasetError, match="1 infected past the end"):
        covid_ct_md.read_covid_ct_md(published, labels_file=tmp_path / "past-end.npy")
    np.save(tmp_path / "three.npy", np.full((2, PADDED_TO), 3, np.uint8))
    with pytest.raises(DatasetError, match="2-D array of 0 and 1"):
        covid_ct_md.read_covid_ct_md(published, labels_file=tmp_path / "three.npy")


@needs_data
def test_an_index_that_does_not_fit_the_array_is_refused(published, tmp_path):
    root = tmp_path / "root"
    link_folder(P002, root / "COVID-19 Cases" / "P002")
    np.save(root / "Slice-level-labels.npy", np.load(published / "Slice-level-labels.npy"))
    (root / "Index.csv").write_text(
        "Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./,P001\n"
        "1,COVID-19,./,P002\n5,CAP,./,cap001\n"
    )
    with pytest.raises(DatasetError, match=r"3 patients up to Label Index 5.*2 rows"):
        covid_ct_md.read_covid_ct_md(root)
    (root / "Index.csv").write_text("Label Index,Diagnosis,Folder/ID\n1,Influenza,P002\n")
    with pytest.raises(DatasetError, match="line 2: unknown diagnosis"):
        covid_ct_md.read_covid_ct_md(root)


def test_a_folder_without_dicom_is_no_dataset(tmp_path):
    (tmp_path / "P002").mkdir()
    with pytest.raises(DatasetError, match="no patient folder of DICOM files"):
        covid_ct_md.read_covid_ct_md(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        covid_ct_md.read_covid_ct_md(tmp_path / "absent")
