"""The tests' one image writer: synthetic CT slices as DICOM with patient data planted,
TIFF pages, and real series re-stored with other geometry (flipped, transposed,
reformatted), all in memory.

Used by tests/ingest/, test_hostile_input.py, test_phi.py, test_judging_api.py and, through
tests/hostile.py, by tests/tools/fuzz.py. Nothing written here is kept: real data never enters
the repository.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

# Patient data planted in tags and member names: must never reach a log or an error body.
PHI_NAME = "DOE^JOHN"
PHI_STRINGS = (
    PHI_NAME,
    "DOE_JOHN",
    "MRN4711XQ",  # PatientID
    "19700131",  # PatientBirthDate
    "StElsewhereGeneral",  # InstitutionName
    "SecretPrivateNote",  # a private tag
)
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows anterior → posterior, columns right → left


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset written as it is (no preamble or meta header added)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def file_bytes(ds: Dataset) -> bytes:
    """A dataset written as a DICOM file: preamble, 'DICM', meta header."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def plant_phi(ds: Dataset) -> Dataset:
    """Patient data in the usual tags, an institution and a private tag."""
    ds.PatientName = PHI_NAME
    ds.PatientID = "MRN4711XQ"
    ds.PatientBirthDate = "19700131"
    ds.InstitutionName = "StElsewhereGeneral"
    block = ds.private_block(0x0011, "COVIDCT TEST", create=True)
    block.add_new(0x01, "LO", "SecretPrivateNote")
    return ds


def synthetic_ct(
    values: np.ndarray,
    *,
    intercept: str = "-1024",
    slope: str = "1",
    z: float | None = 0.0,
    orientation: Sequence[float] = AXIAL,
    uid: str = SERIES_UID,
    instance: int | None = 1,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    bits: int = 16,
    samples: int = 1,
    pixels: bool = True,
) -> bytes:
    """An uncompressed CT slice as DICOM file bytes, patient data planted; `values` are the
    stored values (signed when their dtype is). ImagePositionPatient is [0, 0, z] (none
    when z is None, and then no ImageOrientationPatient either)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType, ds.SeriesInstanceUID = modality, list(image_type), uid
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], list(orientation)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = values.shape[:2]
    signed = values.dtype.kind == "i"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    if pixels:
        dtype = np.dtype(np.uint8) if bits == 8 else np.dtype(np.int16 if signed else np.uint16)
        ds.PixelData = values.astype(dtype).tobytes()
    return file_bytes(plant_phi(ds))


def multi_frame_ct(
    values: np.ndarray, *, rle: bool = False, offset_table: bool = True, fragments: int = 1
) -> bytes:
    """A multi-frame CT object of these uint16 stored values [frames, rows, columns] as DICOM
    file bytes (intercept −1024: the values are HU + 1024), patient data planted, without
    positions (its frames keep their file order): uncompressed, or RLE Lossless encoded by
    pydicom with or without a Basic Offset Table, each frame in `fragments` fragments."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(values[0], z=None)))
    ds.NumberOfFrames = len(values)
    ds.PixelData = np.ascontiguousarray(values, dtype=np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless, encoding_plugin="pydicom")
        encoded = list(generate_frames(ds.PixelData, number_of_frames=len(values)))
        ds.PixelData = encapsulate(encoded, fragments_per_frame=fragments, has_bot=offset_table)
    return file_bytes(ds)


def tiff_bytes(values: np.ndarray, **kwargs: object) -> bytes:
    """A TIFF file of `values` (one page per 2-D image); kwargs go to tifffile.imwrite."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, **kwargs)
    return buf.getvalue()


# --- real series re-stored ------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """A real axial series as stored: its files' headers and decoded stored values."""

    headers: tuple[Dataset, ...]  # without pixel data, in file order
    pixels: np.ndarray  # [K, R, C] stored values, in file order

    @property
    def positions(self) -> np.ndarray:
        return np.array([[float(v) for v in h.ImagePositionPatient] for h in self.headers])


def read_volume(folder: Path) -> Volume:
    """Every .dcm of a folder, in name order, decoded with pydicom (pylibjpeg for JPEG)."""
    headers, pixels = [], []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels.append(ds.pixel_array)
        del ds.PixelData
        headers.append(ds)
    return Volume(tuple(headers), np.stack(pixels))


@dataclass(frozen=True)
class Plane:
    """One slice's geometry: ImageOrientationPatient (row, column cosines), the position
    of its first pixel and PixelSpacing (between rows, between columns), in mm."""

    row: np.ndarray
    col: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float]

    @staticmethod
    def of(ds: Dataset) -> Plane:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        spacing = [float(v) for v in ds.PixelSpacing]
        origin = np.array([float(v) for v in ds.ImagePositionPatient])
        return Plane(np.array(iop[:3]), np.array(iop[3:]), origin, (spacing[0], spacing[1]))


def flip_columns(image: np.ndarray, plane: Plane) -> tuple[np.ndarray, Plane]:
    """Left-right: the last column becomes the first; the row direction reverses."""
    origin = plane.origin + (image.shape[1] - 1) * plane.spacing[1] * plane.row
    return image[:, ::-1], Plane(-plane.row, plane.col, origin, plane.spacing)


def flip_rows(image: np.ndarray, plane: Plane) -> tuple[np.ndarray, Plane]:
    """Up-down: the last row becomes the first; the column direction reverses."""
    origin = plane.origin + (image.shape[0] - 1) * plane.spacing[0] * plane.col
    return image[::-1], Plane(plane.row, -plane.col, origin, plane.spacing)


def transpose(image: np.ndarray, plane: Plane) -> tuple[np.ndarray, Plane]:
    """Rows become columns: the two directions (and spacings) swap; the first pixel stays."""
    spacing = (plane.spacing[1], plane.spacing[0])
    return image.T, Plane(plane.col, plane.row, plane.origin, spacing)


def _slice_file(
    header: Dataset, image: np.ndarray, plane: Plane, series_uid: str, photometric: str | None
) -> bytes:
    ds = copy.deepcopy(header)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (*plane.row, *plane.col)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in plane.origin]
    ds.PixelSpacing = [round(s, 6) for s in plane.spacing]
    ds.Rows, ds.Columns = image.shape
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    dtype = np.int16 if int(ds.PixelRepresentation) else np.uint16  # 16-bit CT
    ds.PixelData = np.ascontiguousarray(image, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OW"
    return file_bytes(ds)


def restored(
    volume: Volume, folder: str, *steps: str, photometric: str | None = None
) -> list[tuple[str, bytes]]:
    """The volume re-stored uncompressed as a new series, each slice changed by `steps`
    ('flip_columns', 'flip_rows', 'transpose', in order) with its geometry changed to match,
    so every pixel keeps its place in the patient. (member name, bytes) per slice."""
    uid, moves = generate_uid(), [_MOVES[s] for s in steps]
    files = []
    for k, (header, image) in enumerate(zip(volume.headers, volume.pixels, strict=True)):
        plane = Plane.of(header)
        for move in moves:
            image, plane = move(image, plane)
        files.append(
            (f"{folder}/IM{k + 1:04d}.dcm", _slice_file(header, image, plane, uid, photometric))
        )
    return files


_MOVES = {"flip_columns": flip_columns, "flip_rows": flip_rows, "transpose": transpose}


def reformatted(volume: Volume, plane: str, folder: str, step: int = 16) -> list[tuple[str, bytes]]:
    """A multiplanar reformat of an axial volume stored head → feet with uniform spacing
    and IOP [1,0,0,0,1,0]: coronal (one slice per `step` rows, anterior → posterior) or
    sagittal (one per `step` columns, patient right → left). Each slice's rows run head →
    feet; its columns run right → left (coronal) or anterior → posterior (sagittal)."""
    first, last = Plane.of(volume.headers[0]), Plane.of(volume.headers[-1])
    if not (np.allclose(first.row, [1, 0, 0]) and np.allclose(first.col, [0, 1, 0])):
        raise ValueError("reformatted() takes an axial volume in the standard display")
    down = np.array([0.0, 0.0, -1.0])  # head → feet, as the axial slices are stored
    if (last.origin - first.origin) @ down <= 0:
        raise ValueError("reformatted() takes a volume stored head → feet")
    gap = float(np.linalg.norm(last.origin - first.origin)) / (len(volume.headers) - 1)
    dr, dc = first.spacing
    if plane == "coronal":  # cut across the rows: the image keeps the columns
        axis, across, along, spacing = 1, first.col, first.row, (gap, dc)
    elif plane == "sagittal":  # cut across the columns: the image keeps the rows
        axis, across, along, spacing = 2, first.row, first.col, (gap, dr)
    else:
        raise ValueError(f"plane must be 'coronal' or 'sagittal'. Received: {plane!r}")
    uid, files = generate_uid(), []
    cut_spacing = dr if plane == "coronal" else dc
    for n, i in enumerate(range(0, volume.pixels.shape[axis], step)):
        geometry = Plane(along, down, first.origin + i * cut_spacing * across, spacing)
        image = np.take(volume.pixels, i, axis=axis)  # [K, columns or rows]
        ds = copy.deepcopy(volume.headers[0])
        ds.InstanceNumber = n + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.SliceThickness = round(cut_spacing, 6)  # one pixel of the axial slices
        files.append((f"{folder}/IM{n + 1:04d}.dcm", _slice_file(ds, image, geometry, uid, None)))
    return files
