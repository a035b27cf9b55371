"""A DICOM member → frames: header checks, the Modality LUT, geometry; pixels on demand.

Every frame's pixels leave as uint16 stored values in the paper's domain: HU (the
Modality LUT: RescaleSlope and RescaleIntercept, per frame in enhanced objects) + 1024,
clipped at 0. The Photometric Interpretation never changes them: MONOCHROME1 only tells a
viewer to show low values bright (docs/judging.md).

Without a decode pool, pixels are decoded from the parsed dataset (`Frame.load`). With one,
from a `DecodeTask` (`decode_frame`, in a worker; in this thread should the pool break): the
Pixel Data value (`one_frame`: only that frame's bytes) and pydicom's description of it,
read here once, so that a worker never parses the header again. Both give the same values:
pydicom's decoder gets the same frame bytes and options either way.
"""

from __future__ import annotations

import io
import logging
import posixpath
from functools import partial
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from app import errors
from app.ingest.frames import MAX_SIDE, DecodeTask, Frame, Skip
from app.ingest.limits import IngestLimits
from app.ingest.orientation import Orientation

logger = logging.getLogger(__name__)

OFFSET = 1024  # stored value = HU + OFFSET
_MAX_SLOPE, _MAX_INTERCEPT = 1e3, 1e5  # CT uses slope ~1 and intercept ~−1024 or 0
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_ROUND_MM = 6  # geometry values are reported to the µm at most
_IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
# Left out of the kept header: large and of no use to a result that copies patient and
# study modules (an enhanced CT's per-frame groups hold one item per frame).
_HEADER_LEFT_OUT = frozenset(
    {Tag("PerFrameFunctionalGroupsSequence"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
)


def is_dicom_file(data: bytes) -> bool:
    """The DICOM file preamble's marker ('DICM' at byte 128)."""
    return data[128:132] == b"DICM"


def read_dicom(index: int, name: str, data: bytes, limits: IngestLimits) -> list[Frame]:
    """One frame per DICOM frame; header facts only (raises Skip or a CovidCTError)."""
    if is_dicom_file(data) and _stored_syntax(data) == DeflatedExplicitVRLittleEndian:
        # pydicom inflates a deflated data set whole, with no bound: a few MB could expand
        # to GBs before any limit is checked. CT is never sent this way in practice.
        raise Skip("syntax", "deflated transfer syntax: its expansion cannot be bounded")
    ds = pydicom.dcmread(io.BytesIO(data)) if is_dicom_file(data) else _read_unmarked(data)
    if "PixelData" not in ds and _PIXEL_DATA_TAG in data:
        # pydicom stops quietly at the end of a truncated file, dropping the element
        raise Skip("corrupt", "pixel data truncated or unreadable")
    _check(ds)
    syntax = _transfer_syntax(ds)
    decoder = _decoder(syntax)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= n_frames <= limits.max_slices_per_series:
        raise errors.TooManySlicesError(f"archive member {index} holds {n_frames} frames")
    pixels, options = ds.PixelData, _pixel_options(ds)  # what a decode worker needs
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    common: dict[str, Any] = {
        "member": index,
        "name": name,
        "kind": "dicom",
        "key": uid or posixpath.dirname(name) or ".",
        "shape": (int(ds.Rows), int(ds.Columns)),
        "instance": _to_int(ds.get("InstanceNumber")),
        "by_folder": not uid,
        "uids": tuple(str(ds.get(k) or "").strip() for k in _IDENTIFIERS),
        "header": source_header(ds),
    }
    frames = []
    for i in range(n_frames):
        tag = partial(_lookup, ds, (per_frame[i] if i < len(per_frame) else None, shared))
        slope, intercept = (
            _number(tag("PixelValueTransformationSequence", k), default)
            for k, default in (("RescaleSlope", 1), ("RescaleIntercept", 0))
        )
        if not (0 < abs(slope) <= _MAX_SLOPE and abs(intercept) <= _MAX_INTERCEPT):
            # finite but absurd (a corrupt header): would overflow the HU conversion
            raise Skip("corrupt", "RescaleSlope or RescaleIntercept outside any CT range")
        orientation = Orientation.from_cosines(
            _floats(tag("PlaneOrientationSequence", "ImageOrientationPatient"))
        )
        ipp = _floats(tag("PlanePositionSequence", "ImagePositionPatient"))
        frames.append(
            Frame(
                **common,
                load=partial(load_frame, decoder, ds, i, slope, intercept),
                frame=i if n_frames > 1 else None,
                position=orientation.position(ipp) if orientation and _finite(ipp, 3) else None,
                task=DecodeTask(str(syntax), pixels, i, options, slope, intercept),
                orientation=orientation,
                spacing=_pair(tag("PixelMeasuresSequence", "PixelSpacing")),
                thickness=_length(tag("PixelMeasuresSequence", "SliceThickness")),
                tilt=_angle(tag("CTAcquisitionDetailsSequence", "GantryDetectorTilt")),
            )
        )
    return frames


def source_header(ds: Dataset) -> Dataset:
    """The member's header without pixel data or per-frame groups (kept in memory for the
    DICOM results' patient and study modules; never logged)."""
    tags = list(ds.keys())  # iterating the dataset itself would convert every element
    header = Dataset(
        {t: ds.get_item(t) for t in tags if t.group != 0x7FE0 and t not in _HEADER_LEFT_OUT}
    )
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = meta
    return header


def _stored_syntax(data: bytes) -> str | None:
    """The file meta group's Transfer Syntax UID, read without touching the data set."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        return str(_read_file_meta_info(fp).get("TransferSyntaxUID", "")) or None
    except Exception:  # a broken meta group: dcmread then decides what the file is
        return None


def _read_unmarked(data: bytes) -> Dataset:
    """A DICOM file without preamble (or meta header); anything else is skipped."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # force=True on arbitrary bytes fails in many ways
        raise Skip("other", "neither DICOM nor TIFF") from e
    if not any(keyword in ds for keyword in ("PixelData", "SOPClassUID", "Modality")):
        raise Skip("other", "neither DICOM nor TIFF")
    return ds


def _check(ds: Dataset) -> None:
    """Skip what cannot be a CT slice of raw stored values."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise Skip("image", "float DICOM pixel data has lost the raw stored values")
        raise Skip("other", "DICOM object without pixel data (not an image)")
    if str(ds.get("Modality") or "CT").strip().upper() != "CT":
        raise Skip("other", "not a CT image (Modality)")
    if "LOCALIZER" in [str(v).strip().upper() for v in _as_list(ds.get("ImageType"))]:
        raise Skip("other", "localizer (scout) image, not an axial slice")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or not photometric.startswith("MONOCHROME"):
        raise Skip("image", "colour DICOM image cannot hold raw CT values")
    if int(ds.BitsAllocated) < 16:
        raise Skip("image", f"{int(ds.BitsAllocated)}-bit DICOM image cannot hold raw CT values")
    if not (0 < int(ds.Rows) <= MAX_SIDE and 0 < int(ds.Columns) <= MAX_SIDE):
        raise Skip("image", f"image larger than {MAX_SIDE} pixels a side is not a CT slice")


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax; without a meta header, the encoding pydicom read."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        implicit, little = ds.original_encoding
        ts = ExplicitVRBigEndian if not little else ExplicitVRLittleEndian
        ts = ImplicitVRLittleEndian if implicit else ts
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = ts
    return UID(str(ts))


def _pixel_options(ds: Dataset) -> dict[str, Any]:
    """What pydicom's decoder reads from a dataset besides the Pixel Data value (as
    `Decoder.as_array` does for a dataset source): the Image Pixel module's description,
    the pixel keyword and VR, and the Extended Offset Table if any."""
    if sum(keyword in ds for keyword in _PIXEL_KEYWORDS) != 1:
        # pydicom refuses to decode such a dataset ("one and only one" pixel data element)
        raise Skip("corrupt", "more than one pixel data element")
    return {**as_pixel_options(ds), "pixel_keyword": "PixelData", "pixel_vr": ds["PixelData"].VR}


def _decoder(ts: UID) -> Decoder:
    label = ts.name if ts.name != str(ts) else "unknown"  # known UIDs only: no free text
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise Skip("syntax", f"unsupported transfer syntax ({label})") from e
    if not decoder.is_available:
        raise Skip("syntax", f"no decoder installed for transfer syntax ({label})")
    return decoder


# --- pixels ---------------------------------------------------------------------------


def load_frame(
    decoder: Decoder, ds: Dataset, index: int, slope: float, intercept: float
) -> np.ndarray:
    """One frame's pixels as uint16 HU + 1024, in the stored orientation."""
    raw, _ = decoder.as_array(ds, index=index)
    return to_stored_values(raw, slope, intercept)


def decode_frame(
    syntax: str,
    pixels: bytes,
    frame: int,
    options: dict[str, Any],
    slope: float,
    intercept: float,
) -> np.ndarray:
    """`load_frame` from a `DecodeTask` (`decode_frame(*task)`): in a decode worker process
    (DecodePool), or in this thread when the pool broke. No header is parsed."""
    try:
        raw, _ = get_decoder(syntax).as_array(pixels, index=frame, **options)
        return to_stored_values(raw, slope, intercept)
    except Exception as e:  # sent back pickled: a plain type that carries only the kind
        raise RuntimeError(type(e).__name__) from None


def one_frame(task: DecodeTask) -> DecodeTask:
    """The task with only its own frame's bytes, as sent to a worker: a multi-frame file's
    tasks share its whole Pixel Data value, which would otherwise be pickled for each frame.

    The frame's bytes are those pydicom's decoder would take from the whole value (for
    encapsulated syntaxes, its `get_frame`; it scans the fragments when there is no Basic
    Offset Table), so the frame decodes to the same values. Where that is not certain (an
    Extended Offset Table, an odd-length frame, a short buffer, anything raising), the task
    goes whole and the worker meets what decoding the whole value meets."""
    options = task.options
    try:
        frames = int(options.get("number_of_frames") or 1)
        if frames == 1 or "extended_offsets" in options:
            return task
        if UID(task.syntax).is_encapsulated:
            frame = get_frame(task.pixels, task.frame, number_of_frames=frames)
            if len(frame) % 2:  # encapsulate() would pad it
                return task
            pixels = encapsulate([frame], has_bot=False)
        else:
            bits = int(options["bits_allocated"])
            pixel_count = int(options["rows"]) * int(options["columns"])
            length = pixel_count * int(options["samples_per_pixel"]) * bits // 8
            if bits % 8 or length < 1 or len(task.pixels) < length * frames:
                return task  # as a whole: the decoder's own length checks apply
            pixels = task.pixels[task.frame * length : (task.frame + 1) * length]
    except Exception:  # corrupt data: the worker reports it
        return task
    return task._replace(pixels=pixels, frame=0, options={**options, "number_of_frames": 1})


def to_stored_values(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values → HU (slope, intercept) → HU + 1024, clipped to uint16 [0, 65535]."""
    offset = intercept + OFFSET
    if slope == 1 and offset == 0 and raw.dtype == np.uint16:
        return raw  # already the paper's domain (RescaleIntercept −1024): no copy
    if slope == 1 and float(offset).is_integer():
        values = raw.astype(np.int64) + int(offset)
    else:
        values = np.rint(raw * slope + offset)
    return np.clip(values, 0, 65535).astype(np.uint16)


# --- header values --------------------------------------------------------------------


def _lookup(ds: Dataset, groups: tuple[Dataset | None, ...], sequence: str, key: str) -> object:
    """A value from the per-frame, then the shared functional groups, then the top level."""
    for group in groups:
        item = _item(group, sequence)
        if item is not None and item.get(key) is not None:
            return item.get(key)
    return ds.get(key)


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    items = ds.get(sequence) if ds is not None else None
    return items[0] if items else None


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple | MultiValue) else [value]


def _number(value: object, default: float) -> float:
    """A DS value as float, tolerating odd text (' -1024 ', '-01.024E+03', multi-valued)."""
    values = _as_list(value)
    if not values or not str(values[0]).strip():
        return float(default)
    try:
        number = float(str(values[0]).strip())
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise Skip("corrupt", "unreadable RescaleSlope or RescaleIntercept")
    return number


def _to_int(value: object) -> int | None:
    try:
        return int(float(str(_as_list(value)[0]).strip()))
    except (IndexError, ValueError, OverflowError):
        return None


def _floats(value: object) -> np.ndarray:
    """A multi-valued DS as float64 (empty when any value is unreadable)."""
    try:
        return np.array([float(str(v).strip()) for v in _as_list(value)], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return np.zeros(0)


def _finite(values: np.ndarray, n: int) -> bool:
    return values.shape == (n,) and bool(np.all(np.isfinite(values)))


def _pair(value: object) -> tuple[float, float] | None:
    """PixelSpacing (between rows, between columns) in mm; None unless two positive values."""
    values = _floats(value)
    if not _finite(values, 2) or not np.all(values > 0):
        return None
    return round(float(values[0]), _ROUND_MM), round(float(values[1]), _ROUND_MM)


def _length(value: object) -> float | None:
    values = _floats(value)
    if not _finite(values[:1], 1) or not values[0] > 0:
        return None
    return round(float(values[0]), _ROUND_MM)


def _angle(value: object) -> float | None:
    values = _floats(value)
    if not _finite(values[:1], 1) or not abs(values[0]) <= 90:
        return None
    return round(float(values[0]), _ROUND_MM)
