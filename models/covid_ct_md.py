"""COVID-CT-MD (Afshar et al., Scientific Data 8:121, 2021) on disk, for external validation.

The published layout (figshare collection 5129081, github.com/ShahinSHH/COVID-CT-MD):

    <root>/Index.csv                 the patients with slice labels (COVID-19 and CAP cases):
                                     columns Label Index, Diagnosis, Relative Path, Folder/ID
    <root>/Slice-level-labels.npy    2-D 0/1 array: row = Label Index, column = slice number
                                     with the slices in ascending SliceLocation (0020,1041);
                                     rows padded with 0 to the longest series
    <root>/<class>/<Folder/ID>/*.dcm one DICOM file per slice; class folders "COVID-19 Cases",
                                     "CAP Cases", "Normal Cases" (or "... subjects")

`Slice-level-labels-updated-1.npy` (the authors' revision of P001 and P006) is preferred
where present. The published Index.csv skips Label Index 43; when the array has one row per
listed patient (so the highest index would be out of range), rows are taken in the order of
the Label Index (the k-th listed patient is row k).

Also read, as the fixtures in ../shared/data hold it: `<root>/<ID>/*.dcm` with the labels in
`<root>/<ID>-slice-labels.csv` (columns `file`, `infected`), keyed by file name.

The class of a patient comes from Index.csv, else from its class folder, else from the
dataset's naming (P… COVID-19, cap… CAP, normal… normal). Normal patients have no infected
slice: every slice is labelled 0. COVID-19 patients without slice labels count at patient
level only. CAP patients are left out: the network has no class for them.

DICOM series are read through the service's ingest (the same value domain, grouping,
ordering, orientation and set-aside rules), from a zip built in memory.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.contract import CLASS_NAMES, COVID_CLASS
from app.domain import Study
from app.errors import CovidCTError
from app.ingest import natural_key
from app.selection import SelectionRule
from models.data import DatasetError
from models.scoring import PatientScore, Predict, SliceScores, log_patient, score_series

logger = logging.getLogger(__name__)

INDEX_FILE = "Index.csv"
LABEL_FILES = ("Slice-level-labels-updated-1.npy", "Slice-level-labels.npy")
CSV_LABELS_SUFFIX = "-slice-labels.csv"
INDEX_COLUMNS = ("Label Index", "Diagnosis", "Folder/ID")
DIAGNOSES = ("covid", "normal", "cap")  # the first two are CLASS_NAMES

# A zip of one patient folder → the service's Study (app.ingest with the service's limits).
ReadZip = Callable[[bytes], Study]


@dataclass(frozen=True)
class LabelledPatient:
    patient: str  # the dataset's Folder/ID, e.g. P002, normal002
    diagnosis: str  # one of DIAGNOSES
    folder: Path
    slice_labels: dict[str, int] | None  # file name → 1 infected, 0 not; None: not labelled
    label_source: str  # where the labels came from, in words

    @property
    def label(self) -> int | None:
        """Index into CLASS_NAMES; None for CAP."""
        return CLASS_NAMES.index(self.diagnosis) if self.diagnosis in CLASS_NAMES else None


def read_covid_ct_md(
    root: str | Path, *, labels_file: str | Path | None = None
) -> list[LabelledPatient]:
    """Every patient folder under `root` (depth 1 or 2), with its class and slice labels."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"COVID-CT-MD folder not found. Received: {base}")
    index = _read_index(base / INDEX_FILE) if (base / INDEX_FILE).is_file() else {}
    array, array_name = _label_array(base, labels_file) if index else (None, "")
    rows = _row_of(index, array) if array is not None else {}
    patients = []
    for folder in _patient_folders(base):
        name = folder.name
        diagnosis = index[name][1] if name in index else _diagnosis_of(folder, base)
        if diagnosis is None:
            logger.warning(
                "skipped folder %s: no class (not in %s, no class folder)", name, INDEX_FILE
            )
            continue
        labels, source = _labels(base, folder, diagnosis, array, rows.get(name), array_name)
        patients.append(LabelledPatient(name, diagnosis, folder, labels, source))
    if missing := sorted(set(index) - {p.patient for p in patients}, key=natural_key):
        logger.warning("%d patients of %s have no folder here", len(missing), INDEX_FILE)
    if not patients:
        raise DatasetError(f"no patient folder of DICOM files under {base}")
    return patients


def describe(patients: Sequence[LabelledPatient]) -> str:
    """'2 patients (1 covid, 1 normal), 1 with slice labels; 0 CAP left out'."""
    kept = [p for p in patients if p.label is not None]
    counts = Counter(p.diagnosis for p in kept)
    labelled = sum(1 for p in kept if p.slice_labels is not None and p.diagnosis == "covid")
    by_class = ", ".join(f"{counts[c]} {c}" for c in CLASS_NAMES)
    return (
        f"{len(kept)} patients ({by_class}); {labelled} COVID-19 with radiologists' slice "
        f"labels; {len(patients) - len(kept)} CAP left out"
    )


# --- the files ------------------------------------------------------------------------------


def _read_index(path: Path) -> dict[str, tuple[int, str]]:
    """Folder/ID → (Label Index, diagnosis)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip(): c for c in reader.fieldnames or []}
        if not set(INDEX_COLUMNS) <= set(columns):
            raise DatasetError(
                f"{INDEX_FILE} needs columns {INDEX_COLUMNS}. Received: {reader.fieldnames}"
            )
        index = {}
        for line, row in enumerate(reader, start=2):
            name = row[columns["Folder/ID"]].strip()
            diagnosis = _diagnosis(row[columns["Diagnosis"]])
            try:
                number = int(row[columns["Label Index"]])
            except ValueError as e:
                raise DatasetError(f"{INDEX_FILE} line {line}: Label Index is not a number") from e
            if diagnosis is None:
                raise DatasetError(
                    f"{INDEX_FILE} line {line}: unknown diagnosis. Received: "
                    f"{row[columns['Diagnosis']]!r}"
                )
            index[name] = (number, diagnosis)
    return index


def _label_array(base: Path, labels_file: str | Path | None) -> tuple[np.ndarray | None, str]:
    candidates = [Path(labels_file)] if labels_file else [base / n for n in LABEL_FILES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if labels_file:
            raise DatasetError(f"slice labels file not found. Received: {labels_file}")
        logger.warning("%s but no %s: slice labels of CSV files only", INDEX_FILE, LABEL_FILES[1])
        return None, ""
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or not np.isin(array, (0, 1)).all():
        raise DatasetError(
            f"slice labels must be a 2-D array of 0 and 1. Received: {array.dtype} "
            f"{array.shape} in {path.name}"
        )
    return array.astype(np.int8), path.name


def _row_of(index: dict[str, tuple[int, str]], array: np.ndarray) -> dict[str, int]:
    """Folder/ID → row of the label array (see the module docstring on Label Index 43)."""
    numbers = {name: number for name, (number, _) in index.items()}
    if max(numbers.values()) < len(array):
        return numbers
    if len(numbers) == len(array):
        ranked = sorted(numbers, key=numbers.__getitem__)
        return {name: row for row, name in enumerate(ranked)}
    raise DatasetError(
        f"{INDEX_FILE} lists {len(numbers)} patients up to Label Index {max(numbers.values())}, "
        f"but the slice label array has {len(array)} rows"
    )


def _patient_folders(base: Path) -> list[Path]:
    """Folders holding .dcm files, at depth 1 (<root>/<ID>) or 2 (<root>/<class>/<ID>)."""
    found = []
    for first in sorted(p for p in base.iterdir() if p.is_dir()):
        if _dicom_files(first):
            found.append(first)
        else:
            found += sorted(p for p in first.iterdir() if p.is_dir() and _dicom_files(p))
    return sorted(found, key=lambda p: natural_key(p.name))


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _diagnosis(text: str) -> str | None:
    """'COVID-19', 'COVID-19 Cases' → covid; 'CAP', 'Cap Cases' → cap; 'Normal …' → normal."""
    key = text.strip().lower()
    return next((d for d in DIAGNOSES if key.startswith(d)), None)


def _diagnosis_of(folder: Path, base: Path) -> str | None:
    """From the class folder holding it, else from the dataset's ID (P002, cap001, normal002)."""
    if folder.parent != base and (by_folder := _diagnosis(folder.parent.name)):
        return by_folder
    if re.fullmatch(r"[Pp]\d+", folder.name):
        return "covid"
    return _diagnosis(folder.name)


def _labels(
    base: Path,
    folder: Path,
    diagnosis: str,
    array: np.ndarray | None,
    row: int | None,
    array_name: str,
) -> tuple[dict[str, int] | None, str]:
    if diagnosis not in CLASS_NAMES:
        return None, "CAP: left out"
    files = _dicom_files(folder)
    for csv_path in (
        base / f"{folder.name}{CSV_LABELS_SUFFIX}",
        folder.parent / f"{folder.name}{CSV_LABELS_SUFFIX}",
    ):
        if csv_path.is_file():
            return _csv_labels(csv_path, files), csv_path.name
    if array is not None and row is not None:
        return _array_labels(array[row], files, folder.name), f"{array_name} row {row}"
    if diagnosis == "normal":
        return {f.name: 0 for f in files}, "normal patient: no infected slice"
    return None, "none"


def _csv_labels(path: Path, files: Sequence[Path]) -> dict[str, int]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"file", "infected"} <= set(reader.fieldnames or []):
            raise DatasetError(
                f"{path.name} needs columns file and infected. Received: {reader.fieldnames}"
            )
        labels = {row["file"].strip(): int(row["infected"]) for row in reader}
    names = {f.name for f in files}
    if set(labels) != names or not set(labels.values()) <= {0, 1}:
        raise DatasetError(
            f"{path.name} must label each of the {len(names)} DICOM files of its folder with "
            f"0 or 1. Received: {len(labels)} rows, {len(set(labels) & names)} matching files"
        )
    return labels


def _array_labels(row: np.ndarray, files: Sequence[Path], patient: str) -> dict[str, int]:
    """The row's first len(files) entries, in ascending SliceLocation; the rest must be 0."""
    if len(row) < len(files) or row[len(files) :].any():
        raise DatasetError(
            f"the slice labels of {patient} do not fit its {len(files)} DICOM files "
            f"(row of {len(row)}, {int(row[len(files) :].sum())} infected past the end)"
        )
    ordered = sorted(files, key=lambda f: (_slice_location(f, patient), natural_key(f.name)))
    return {f.name: int(v) for f, v in zip(ordered, row[: len(files)], strict=True)}


def _slice_location(path: Path, patient: str) -> float:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SliceLocation"])
    value = ds.get("SliceLocation")  # by keyword: the value itself, or None
    if value in (None, ""):
        raise DatasetError(
            f"a DICOM file of {patient} has no SliceLocation (0020,1041), by which the "
            "dataset orders its slice labels"
        )
    return float(value)


# --- scoring ---------------------------------------------------------------------------------


def zip_folder(folder: Path) -> bytes:
    """The folder's .dcm files as a zip in memory (stored), named by file name."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for path in _dicom_files(folder):
            zf.write(path, path.name)
    return buf.getvalue()


def score_patients(
    patients: Sequence[LabelledPatient],
    predict: Predict,
    rule: SelectionRule,
    read_zip: ReadZip,
    *,
    batch_size: int = 8,
    every_slice: bool = False,
) -> list[PatientScore]:
    """COVID and normal patients through the service's ingest and open-lung rule, scored."""
    judged = [p for p in patients if p.label is not None]
    scored = []
    for i, patient in enumerate(judged, start=1):
        started = time.perf_counter()
        try:
            study = read_zip(zip_folder(patient.folder))
        except CovidCTError as e:  # what the service would answer with a problem
            raise DatasetError(f"{patient.patient}: the service's ingest refused it: {e}") from e
        series = tuple(
            score_series(
                f"series{s.index}",
                s.pixels,
                predict,
                rule,
                batch_size=batch_size,
                set_aside=s.set_aside,
                sources=tuple(info.source for info in s.slices),
                every_slice=every_slice,
            )
            for s in study.series
        )
        assert patient.label is not None
        scored.append(PatientScore(patient.patient, patient.label, series))
        log_patient(i, len(judged), series, started)
    return scored


def labelled_slices(
    patients: Sequence[PatientScore], labels: dict[str, dict[str, int]]
) -> tuple[SliceScores, int]:
    """The scored slices that carry a radiologist's label (infected → the covid class), and
    how many labelled files gave no slice (skipped by ingest, or a duplicate position)."""
    names, y, p, sent_list = [], [], [], []
    unmatched = 0
    for patient in patients:
        by_file = labels.get(patient.patient)
        if by_file is None:
            continue
        seen = set()
        for s in patient.series:
            for source, score, was_sent in zip(s.sources, s.covid_probability, s.sent, strict=True):
                seen.add(source)
                if source in by_file and np.isfinite(score):
                    names.append(f"{patient.patient}/{source}")
                    y.append(COVID_CLASS if by_file[source] else 1 - COVID_CLASS)
                    p.append(score)
                    sent_list.append(was_sent)
        unmatched += len(set(by_file) - seen)
    scores = SliceScores(
        tuple(names),
        np.array(y, dtype=int),
        np.array(p, dtype=np.float32),
        np.array(sent_list, dtype=bool),
    )
    return scores, unmatched
