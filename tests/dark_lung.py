"""A stand-in model that scores a slice by how dark its lung window is, the CT slices it
scores 0.9 or 0.1, and the service running it: for the tests of a DICOM job's results
(the route, the PACS push). Not a test module."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from fastapi.testclient import TestClient

from app.contract import ModelCard
from dicom_factory import synthetic_ct
from support import sharing_app, started

# Dark ROI pixels above which the stand-in calls a slice COVID: P002's fullest lung slices
# are above it, all of normal002's below.
DARK_CUTOFF = 18_000


class DarkLungModel:
    """Stands in for the SavedModel: 0.9 for a slice with more than DARK_CUTOFF dark pixels
    (< 300) in the paper's ROI, else 0.1, so a test knows each slice's score in advance."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        dark = (batch[:, 240:340, 120:370, 0] < 300).sum(axis=(1, 2))
        return np.where(dark > DARK_CUTOFF, 0.9, 0.1).astype(np.float32)


def dark_lung_slice(
    number: int, *, dark: bool, study_uid: str, series_uid: str, sop_uid: str
) -> bytes:
    """A 512x512 CT slice (instance `number`, z = -number) whose ROI is air when `dark`
    (DarkLungModel scores it 0.9), else faint lung (0.1); with the UIDs given."""
    values = np.full((512, 512), 1024 + 40, np.uint16)  # soft tissue
    values[200:380, 100:400] = 100 if dark else 1024 - 500  # air, or faint lung
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(values, z=-float(number), instance=number)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass(frozen=True)
class DarkLungSeries:
    """One series of dark_lung_slice slices: instance n has SOP Instance UID
    `{sop_root}.{n}` and is dark (scored 0.9) when n is in `dark`."""

    study_uid: str
    series_uid: str
    sop_root: str
    dark: frozenset[int]

    def sop_uid(self, number: int) -> str:
        return f"{self.sop_root}.{number}"

    def ct_slice(self, number: int) -> bytes:
        return dark_lung_slice(
            number,
            dark=number in self.dark,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            sop_uid=self.sop_uid(number),
        )


@contextmanager
def dark_lung_client(**settings: object) -> Iterator[TestClient]:
    """The app (no decode processes) serving DarkLungModel with `settings`; ready when
    yielded."""
    from models.export import untrained_card  # TensorFlow: only for the tests that use it

    model = DarkLungModel(untrained_card(seed=0, head_init_std=0.02))
    with started(sharing_app(model, Path("unused-model-dir"), decode_workers=0, **settings)) as c:
        yield c
