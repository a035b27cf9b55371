"""COVID-CT-MD's published layout, built at test time from the shared fixtures.

<root>/Index.csv              Label Index, Diagnosis, Relative Path, Folder/ID; like the
                              published file it skips a Label Index (there: 43), and it
                              lists a patient whose folder is absent (P001)
<root>/Slice-level-labels.npy one row per listed patient, padded with 0; P002's row holds
                              its radiologist labels in ascending SliceLocation, taken
                              from P002-slice-labels.csv's slice_location column; P001's
                              row is the inverse, so that a wrong row shows
<root>/COVID-19 Cases/P002/   links to the shared DICOM files
<root>/Normal Cases/normal002/
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from shared_data import NORMAL002, P002, P002_LABELS

PADDED_TO = 150  # the published array is as wide as the longest series


def p002_labels() -> dict[str, int]:
    """File name → 1 infected / 0, straight from the shared CSV."""
    with open(P002_LABELS, newline="") as f:
        return {row["file"]: int(row["infected"]) for row in csv.DictReader(f)}


def p002_labels_by_location() -> list[int]:
    with open(P002_LABELS, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["slice_location"]))
    return [int(r["infected"]) for r in rows]


def link_folder(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        (target / path.name).symlink_to(path)


def build_published_layout(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Index.csv").write_text(
        "Label Index,Diagnosis,Relative Path,Folder/ID\n"
        "0,COVID-19,./COVID-19/,P001\n"
        "2,COVID-19,./COVID-19/,P002\n"
    )
    row = np.zeros(PADDED_TO, np.uint8)
    labels = p002_labels_by_location()
    row[: len(labels)] = labels
    decoy = row.copy()
    decoy[: len(labels)] = 1 - row[: len(labels)]
    np.save(root / "Slice-level-labels.npy", np.stack([decoy, row]))
    link_folder(P002, root / "COVID-19 Cases" / "P002")
    link_folder(NORMAL002, root / "Normal Cases" / "normal002")
    return root
