"""Ingest: a zipped upload → ordered series of uint16 slices in the stored-value domain.

    archive.py      the zip: limits and zip-bomb checks before decompressing, bounded reads
    dicom.py        a DICOM member → frames: header checks, Modality LUT, geometry tags
    tiff.py         a TIFF member → frames, one per page
    orientation.py  ImageOrientationPatient: axial or not, the way to the standard display
    series.py       frames → series: grouping, order, duplicates, display, resampling
    geometry.py     a series' spacing, thickness and tilt
    study.py        ingest_zip: the upload → a Study (open_study: series by series)
    limits.py       IngestLimits
    pool.py         DecodePool: worker processes for DICOM pixel data, sized to the cores
    libraries.py    configure_libraries(): the start-up call (pydicom, decoders, logs)

Importing this package changes nothing process-wide: call `configure_libraries()` once
at start-up, before the first `ingest_zip`.
"""

from app.ingest.libraries import configure_libraries
from app.ingest.limits import IngestLimits
from app.ingest.orientation import AXIAL_LIMIT_DEG
from app.ingest.pool import (
    DecodePool,
    DecodePoolBroken,
    decode_workers_or_auto,
    default_decode_workers,
    usable_cores,
)
from app.ingest.series import natural_key
from app.ingest.study import StudyIngest, ingest_zip, open_study

__all__ = [
    "AXIAL_LIMIT_DEG",
    "DecodePool",
    "DecodePoolBroken",
    "IngestLimits",
    "StudyIngest",
    "configure_libraries",
    "decode_workers_or_auto",
    "default_decode_workers",
    "ingest_zip",
    "natural_key",
    "open_study",
    "usable_cores",
]
