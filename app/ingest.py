"""Ingest: a zipped upload → ordered series of uint16 slices in the stored-value domain.

Public entry point: :func:`ingest_zip`. Members are read from the archive in memory, never
extracted to disk. Every slice leaves as uint16 512×512 holding HU + 1024 clipped at 0 (the
paper's Siemens domain). A member that gives no slice is skipped with a reason; the request
fails only when nothing usable is left. Members are named by their 1-based index among the
archive's files: names and tag values may be patient data and never reach logs or errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import posixpath
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, BinaryIO, Literal

import numpy as np
import pydicom
import tifffile
from pydicom import config as dicom_config
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from app import errors
from app.decode_pool import DecodePool, DecodePoolBroken
from app.domain import Series, SkippedMember, SliceInfo, Study
from app.logs import protect_library_logs
from app.settings import Settings

logger = logging.getLogger(__name__)

# pydicom's default "warn" mode echoes invalid tag values (patient data) into warnings and
# its log. Process-wide, but ingest is the service's only pydicom reader. Whatever the
# readers still log or warn loses its text (app/logs.py).
dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
protect_library_logs()


def _never_gdcm() -> None:
    """Take GDCM out of every pydicom decoder, even where it is installed.

    pydicom would try it first for the JPEG family (it decodes JPEG Lossless ~1.5× faster
    than pylibjpeg), but a fuzzed JPEG Lossless stream made it throw a C++ exception that
    aborts the whole process (std::terminate in gdcmJPEGCodec.cxx). pylibjpeg decodes
    every syntax the service takes and raises Python exceptions on bad data.
    """
    for uid in AllTransferSyntaxes:
        # NotImplementedError: no decoder for that syntax; ValueError: no GDCM plugin in it
        with contextlib.suppress(NotImplementedError, ValueError):
            get_decoder(uid).remove_plugin("gdcm")


_never_gdcm()

SIZE = 512  # slices leave ingest as SIZE × SIZE
OFFSET = 1024  # stored value = HU + OFFSET
_MAX_SLOPE, _MAX_INTERCEPT = 1e3, 1e5  # CT uses slope ~1 and intercept ~−1024 or 0
_MAX_SIDE = 4096  # a larger image is no CT slice (and may be a decompression bomb)
_RATIO_MIN_BYTES = 1 << 20  # smaller members are bounded by the total size limit alone
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
# Only these are read: Python bounds their decompression per read; bzip2 and LZMA inflate a
# whole compressed chunk at once, whatever the size asked for.
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name
# Archives inside the archive (zip, gzip, bzip2, xz, 7z, rar) are never opened.
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf")
_ARCHIVE_MAGIC += (b"Rar!",)
_DIRECTIONS = ("left → right", "posterior → anterior", "superior → inferior (head → feet)")

# Why a member gave nothing. When nothing usable is left, the first category present
# picks the error; without any of them it is NoImageError.
_ENCRYPTED, _SYNTAX, _IMAGE, _CORRUPT, _OTHER = "encrypted", "syntax", "image", "corrupt", "other"
_FAILURES: tuple[tuple[str, type[errors.CovidCTError]], ...] = (
    (_ENCRYPTED, errors.EncryptedMemberError),
    (_SYNTAX, errors.UnsupportedTransferSyntaxError),
    (_IMAGE, errors.UnsupportedImageError),
    (_CORRUPT, errors.CorruptMemberError),
)
Skips = list[tuple[str, SkippedMember]]


class _Skip(Exception):
    """A member that gives no slice: a category and a reason free of patient data."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category, self.reason = category, reason


@dataclasses.dataclass
class _Frame:
    """One future slice: header facts now, pixels on `load()` (uint16 stored values)."""

    member: int
    name: str
    kind: Literal["dicom", "tiff"]
    key: str  # SeriesInstanceUID, or the folder (TIFF; DICOM without the UID)
    shape: tuple[int, int]
    load: Callable[[], np.ndarray]
    frame: int | None = None  # 0-based, in multi-frame files only
    position: float | None = None  # mm along the slice normal, signed so head → feet falls
    axis: int = 2  # dominant axis of the slice normal: 0 x, 1 y, 2 z
    instance: int | None = None
    by_folder: bool = False  # DICOM without SeriesInstanceUID
    task: tuple[Any, ...] | None = None  # picklable arguments of _decode_frame (DICOM)


def ingest_zip(
    archive: bytes | BinaryIO, settings: Settings, pool: DecodePool | None = None
) -> Study:
    """Read a zip of DICOM and/or TIFF files into series of uint16 [N, 512, 512] HU + 1024.

    With a `pool`, DICOM pixel data is decoded in its worker processes.

    Raises NotAZipError, TooManyMembersError, ZipBombError, TooManySlicesError or
    MixedSliceSizesError; and, when no usable slice is left, EncryptedMemberError,
    UnsupportedTransferSyntaxError, UnsupportedImageError, CorruptMemberError or
    NoImageError (in that order of precedence), whose detail counts the skip reasons.
    """
    skips: Skips = []
    frames: list[_Frame] = []
    with _open_zip(archive) as zf:
        infos = _check_archive(zf, settings)
        for index, name, data in _read_members(zf, infos, settings, skips):
            try:
                frames += _decode_member(index, name, data, settings)
            except _Skip as s:
                logger.debug("member %d skipped: %s", index, s.reason)
                skips.append((s.category, SkippedMember(index, s.reason)))
            if len(frames) > settings.max_slices_total:
                raise errors.TooManySlicesError(
                    f"the archive holds more than {settings.max_slices_total} slices (the "
                    "limit, counted before duplicates are dropped)"
                )
    groups = _group(frames)
    _check_groups(groups, settings)
    built = [_build_series(key, members, skips, pool) for key, members in groups]
    series = tuple(
        dataclasses.replace(s, index=i) for i, s in enumerate(filter(None, built), start=1)
    )
    if not series:
        raise _nothing_usable(skips, len(infos))
    n_slices, reasons = sum(len(s.slices) for s in series), Counter(s.reason for _, s in skips)
    message = "ingest: %d member(s) → %d series, %d slice(s); skipped %s"
    logger.info(message, len(infos), len(series), n_slices, dict(reasons) or "none")
    return Study(series=series, skipped=tuple(s for _, s in skips), members=len(infos))


# --- the archive ---------------------------------------------------------------------


def _open_zip(archive: bytes | BinaryIO) -> zipfile.ZipFile:
    source = io.BytesIO(archive) if isinstance(archive, bytes | bytearray | memoryview) else archive
    try:
        return zipfile.ZipFile(source)
    except Exception as e:  # crafted archives make zipfile raise many types
        raise errors.NotAZipError("the upload is not a readable zip archive") from e


def _check_archive(zf: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """Limits on what the archive declares, checked before anything is decompressed."""
    infos = [info for info in zf.infolist() if not info.is_dir()]
    if len(infos) > settings.max_members:
        raise errors.TooManyMembersError(
            f"the archive holds {len(infos)} files; the limit is {settings.max_members}"
        )
    declared = sum(info.file_size for info in infos)
    if declared > settings.max_uncompressed_bytes:
        raise errors.ZipBombError(
            f"the archive declares {declared} uncompressed bytes; "
            f"the limit is {settings.max_uncompressed_bytes}"
        )
    _check_layout(zf)
    limit = settings.max_compression_ratio
    for index, info in enumerate(infos, start=1):
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_MIN_BYTES and ratio > limit:
            raise errors.ZipBombError(
                f"archive member {index} expands {ratio:.0f}-fold; the limit is {limit:g}"
            )
    ratio = declared / max(sum(info.compress_size for info in infos), 1)
    if declared > _RATIO_MIN_BYTES and ratio > limit:  # many small members, each under 1 MiB
        raise errors.ZipBombError(f"the archive expands {ratio:.0f}-fold; the limit is {limit:g}")
    return infos


def _check_layout(zf: zipfile.ZipFile) -> None:
    """Members' compressed data lie one after the other before the central directory.

    Overlapping members (one deflate stream referenced by many entries) and compressed
    sizes larger than the archive (which would hide a member's real expansion ratio) are
    how zip bombs defeat per-member limits.
    """
    spans = sorted((info.header_offset, info.compress_size) for info in zf.infolist())
    ends = [offset for offset, _ in spans[1:]] + [zf.start_dir]
    for (offset, size), end in zip(spans, ends, strict=False):
        if offset + _LOCAL_HEADER + size > end:
            raise errors.ZipBombError(
                "archive members overlap or declare more compressed bytes than the archive holds"
            )


def _read_members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], settings: Settings, skips: Skips
) -> Iterator[tuple[int, str, bytes]]:
    """(index, name, bytes) per readable member; each read is bounded, whatever headers say."""
    budget = settings.max_uncompressed_bytes
    for index, info in enumerate(infos, start=1):
        parts = info.filename.split("/")
        if parts[0] == "__MACOSX" or parts[-1].startswith(".") or parts[-1].lower() in _JUNK_NAMES:
            skips.append((_OTHER, SkippedMember(index, "hidden or operating-system file")))
            continue
        if info.flag_bits & 0x1:
            skips.append((_ENCRYPTED, SkippedMember(index, "encrypted archive member")))
            continue
        if info.compress_type not in _METHODS:
            reason = "compression method not supported (only stored and deflated)"
            skips.append((_CORRUPT, SkippedMember(index, reason)))
            continue
        limit = min(info.file_size, budget)
        try:
            with zf.open(info) as member:
                data = member.read(limit + 1)
        except Exception as e:  # zipfile, zlib: many types on corrupt or crafted members
            logger.warning("member %d could not be decompressed (%s)", index, type(e).__name__)
            skips.append((_CORRUPT, SkippedMember(index, "member could not be decompressed")))
            continue
        if len(data) > limit:
            raise errors.ZipBombError(f"archive member {index} expands beyond its declared size")
        budget -= len(data)
        yield index, info.filename, data


# --- one member → frames ---------------------------------------------------------------


def _decode_member(index: int, name: str, data: bytes, settings: Settings) -> list[_Frame]:
    """DICOM ('DICM' at 128, else a forced read) or TIFF (by magic): header facts only."""
    if data.startswith(_ARCHIVE_MAGIC) and data[128:132] != b"DICM":
        raise _Skip(_OTHER, "nested archive (archives inside the upload are not opened)")
    try:
        if data[:4] in _TIFF_MAGIC:
            return _decode_tiff(index, name, data, settings)
        ds = pydicom.dcmread(io.BytesIO(data)) if data[128:132] == b"DICM" else None
        ds = ds if ds is not None else _read_unmarked_dicom(data)
        if "PixelData" not in ds and _PIXEL_DATA_TAG in data:
            # pydicom stops quietly at the end of a truncated file, dropping the element
            raise _Skip(_CORRUPT, "pixel data truncated or unreadable")
        return _decode_dicom(index, name, ds, data, settings)
    except (_Skip, errors.CovidCTError):
        raise
    except Exception as e:  # malformed input makes pydicom and tifffile raise many types
        logger.warning("member %d could not be parsed (%s)", index, type(e).__name__)
        raise _Skip(_CORRUPT, "header could not be parsed") from e


def _read_unmarked_dicom(data: bytes) -> Dataset:
    """A DICOM file without preamble (or meta header); anything else is skipped."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # force=True on arbitrary bytes fails in many ways
        raise _Skip(_OTHER, "neither DICOM nor TIFF") from e
    if not any(keyword in ds for keyword in ("PixelData", "SOPClassUID", "Modality")):
        raise _Skip(_OTHER, "neither DICOM nor TIFF")
    return ds


def _decode_dicom(
    index: int, name: str, ds: Dataset, data: bytes, settings: Settings
) -> list[_Frame]:
    """One frame per DICOM frame; rescale and position from the functional groups if any."""
    photometric = _check_dicom(ds)
    decoder = _decoder(_transfer_syntax(ds))
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= n_frames <= settings.max_slices_per_series:
        raise errors.TooManySlicesError(f"archive member {index} holds {n_frames} frames")
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    invert = _inversion_sum(ds) if photometric == "MONOCHROME1" else None
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
    }
    frames = []
    for i in range(n_frames):
        groups = (per_frame[i] if i < len(per_frame) else None, shared)
        slope, intercept = (
            _number(_lookup(ds, groups, "PixelValueTransformationSequence", k), default)
            for k, default in (("RescaleSlope", 1), ("RescaleIntercept", 0))
        )
        if not (0 < abs(slope) <= _MAX_SLOPE and abs(intercept) <= _MAX_INTERCEPT):
            # finite but absurd (a corrupt header): would overflow the HU conversion
            raise _Skip(_CORRUPT, "RescaleSlope or RescaleIntercept outside any CT range")
        position, axis = _project(
            _lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient"),
            _lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
        )
        load = partial(_load_dicom, decoder, ds, i, slope, intercept, invert)
        task = (data, i, slope, intercept, invert)
        frame = i if n_frames > 1 else None
        frames.append(
            _Frame(**common, load=load, frame=frame, position=position, axis=axis, task=task)
        )
    return frames


def _check_dicom(ds: Dataset) -> str:
    """Skip what cannot be a CT slice of raw stored values; return the photometric."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _Skip(_IMAGE, "float DICOM pixel data has lost the raw stored values")
        raise _Skip(_OTHER, "DICOM object without pixel data (not an image)")
    if str(ds.get("Modality") or "CT").strip().upper() != "CT":
        raise _Skip(_OTHER, "not a CT image (Modality)")
    if "LOCALIZER" in [str(v).strip().upper() for v in _as_list(ds.get("ImageType"))]:
        raise _Skip(_OTHER, "localizer (scout) image, not an axial slice")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or not photometric.startswith("MONOCHROME"):
        raise _Skip(_IMAGE, "colour DICOM image cannot hold raw CT values")
    if int(ds.BitsAllocated) < 16:
        raise _Skip(_IMAGE, f"{int(ds.BitsAllocated)}-bit DICOM image cannot hold raw CT values")
    if not (0 < int(ds.Rows) <= _MAX_SIDE and 0 < int(ds.Columns) <= _MAX_SIDE):
        raise _Skip(_IMAGE, f"image larger than {_MAX_SIDE} pixels a side is not a CT slice")
    return photometric


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


def _decoder(ts: UID) -> Decoder:
    label = ts.name if ts.name != str(ts) else "unknown"  # known UIDs only: no free text
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise _Skip(_SYNTAX, f"unsupported transfer syntax ({label})") from e
    if not decoder.is_available:
        raise _Skip(_SYNTAX, f"no decoder installed for transfer syntax ({label})")
    return decoder


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
    return list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]


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
        raise _Skip(_CORRUPT, "unreadable RescaleSlope or RescaleIntercept")
    return number


def _to_int(value: object) -> int | None:
    try:
        return int(float(str(_as_list(value)[0]).strip()))
    except (IndexError, ValueError, OverflowError):
        return None


def _project(ipp: object, iop: object) -> tuple[float | None, int]:
    """ImagePositionPatient along the slice normal (row × column cosines), and its axis.

    The normal's sign makes its dominant component positive, so descending position is
    head → feet for any axial slice, however it is flipped or rotated in-plane.
    """
    try:
        position = np.array([float(v) for v in _as_list(ipp)])
        cosines = np.array([float(v) for v in _as_list(iop)])
    except (TypeError, ValueError):
        return None, 2
    if position.shape != (3,) or cosines.shape != (6,):
        return None, 2
    normal = np.cross(cosines[:3], cosines[3:])
    axis, norm = int(np.argmax(np.abs(normal))), float(np.linalg.norm(normal))
    if not norm > 1e-6:
        return None, 2
    return float(position @ normal) / norm * float(np.sign(normal[axis])), axis


def _inversion_sum(ds: Dataset) -> int:
    """lo + hi of the stored range: MONOCHROME1 value v reads as MONOCHROME2 lo + hi − v."""
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    return -1 if int(ds.get("PixelRepresentation") or 0) else (1 << bits) - 1


def _load_dicom(
    decoder: Decoder, ds: Dataset, index: int, slope: float, intercept: float, invert: int | None
) -> np.ndarray:
    raw, _ = decoder.as_array(ds, index=index)
    if invert is not None:
        raw = invert - raw.astype(np.int64)
    return _to_stored_values(raw, slope, intercept)


def _decode_frame(
    data: bytes, index: int, slope: float, intercept: float, invert: int | None
) -> np.ndarray:
    """_load_dicom from the member's bytes, in a decode worker process (DecodePool)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        return _load_dicom(_decoder(_transfer_syntax(ds)), ds, index, slope, intercept, invert)
    except Exception as e:  # sent back pickled: a plain type that carries only the kind
        raise RuntimeError(type(e).__name__) from None


def _to_stored_values(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values → HU (slope, intercept) → HU + 1024, clipped to uint16 [0, 65535]."""
    offset = intercept + OFFSET
    if slope == 1 and offset == 0 and raw.dtype == np.uint16:
        return raw  # already the paper's domain (RescaleIntercept −1024): no copy
    if slope == 1 and float(offset).is_integer():
        values = raw.astype(np.int64) + int(offset)
    else:
        values = np.rint(raw * slope + offset)
    return np.clip(values, 0, 65535).astype(np.uint16)


def _decode_tiff(index: int, name: str, data: bytes, settings: Settings) -> list[_Frame]:
    """One frame per page; pixels decode later, from the still open file."""
    pages: list[tifffile.TiffPage] = []
    for page in tifffile.TiffFile(io.BytesIO(data)).pages:
        if len(pages) == settings.max_slices_per_series:
            raise errors.TooManySlicesError(f"archive member {index} holds too many pages")
        _check_tiff_page(page)  # type: ignore[arg-type]
        pages.append(page)  # type: ignore[arg-type]
    key, multi = posixpath.dirname(name) or ".", len(pages) > 1
    return [
        _Frame(
            index, name, "tiff", key, page.shape, partial(_load_tiff, page), i if multi else None
        )
        for i, page in enumerate(pages)
    ]


def _check_tiff_page(page: tifffile.TiffPage) -> None:
    dtype = np.dtype(page.dtype) if page.dtype is not None else np.dtype("V")
    if dtype.kind == "f":
        raise _Skip(_IMAGE, "float TIFF has lost the raw stored values")
    if page.samplesperpixel != 1 or page.photometric != tifffile.PHOTOMETRIC.MINISBLACK:
        raise _Skip(_IMAGE, "RGB, palette or multi-sample TIFF cannot hold raw CT values")
    if dtype.kind not in "ui":
        raise _Skip(_IMAGE, "TIFF sample format cannot hold raw CT values")
    if dtype.itemsize < 2:
        raise _Skip(_IMAGE, "8-bit TIFF cannot hold raw CT values (16-bit needed)")
    if len(page.shape) != 2 or not all(0 < side <= _MAX_SIDE for side in page.shape):
        raise _Skip(_IMAGE, f"TIFF page is not a 2-D image up to {_MAX_SIDE} pixels a side")


def _load_tiff(page: tifffile.TiffPage) -> np.ndarray:
    """Integer pages are stored values as they are: uint16 kept, others clipped to uint16."""
    values = page.asarray()
    if values.dtype == np.uint16:
        return values
    return np.clip(values.astype(np.int64), 0, 65535).astype(np.uint16)


# --- frames → series -----------------------------------------------------------------

GroupKey = tuple[str, bool, str]  # kind, grouped by folder, SeriesInstanceUID or folder


def _group(frames: list[_Frame]) -> list[tuple[GroupKey, list[_Frame]]]:
    """DICOM by SeriesInstanceUID, TIFF by folder; deterministic: by kind, then key."""
    groups: dict[GroupKey, list[_Frame]] = defaultdict(list)
    for frame in frames:
        groups[(frame.kind, frame.by_folder, frame.key)].append(frame)
    return sorted(groups.items(), key=lambda item: item[0])


def _check_groups(groups: list[tuple[GroupKey, list[_Frame]]], settings: Settings) -> None:
    """Per-series limits and sizes, before any pixel is decoded."""
    pixels = 0
    for _, frames in groups:
        if len(frames) > settings.max_slices_per_series:
            raise errors.TooManySlicesError(
                f"a series holds {len(frames)} slices; the limit is "
                f"{settings.max_slices_per_series}"
            )
        shapes = Counter(f.shape for f in frames)
        if len(shapes) > 1:
            sizes = ", ".join(f"{n} × {r}×{c}" for (r, c), n in shapes.most_common())
            raise errors.MixedSliceSizesError(f"slices of one series differ in size: {sizes}")
        pixels += sum(f.shape[0] * f.shape[1] for f in frames)
    if 2 * pixels > settings.max_uncompressed_bytes:
        raise errors.ZipBombError(f"the slices would decode to {2 * pixels} bytes, over the limit")


def _build_series(
    key: GroupKey, frames: list[_Frame], skips: Skips, pool: DecodePool | None
) -> Series | None:
    """Order, drop duplicates, decode into one uint16 stack, resample to 512×512 if needed."""
    kind, series_key = frames[0].kind, key[2]
    frames, order, notes = _order_dicom(frames) if kind == "dicom" else _order_tiff(frames)
    stack = np.empty((len(frames), *frames[0].shape), dtype=np.uint16)
    kept: list[_Frame] = []
    for frame, values in zip(frames, _decoded(frames, pool), strict=True):
        try:
            if isinstance(values, BaseException):
                raise values
            if values.shape != frame.shape:
                raise ValueError("decoded shape differs from the header")
            stack[len(kept)] = values
        except Exception as e:  # decoders raise many types on corrupt data: skip the frame
            logger.warning("member %d: pixels not decoded (%s)", frame.member, type(e).__name__)
            skips.append((_CORRUPT, SkippedMember(frame.member, "pixel data could not be decoded")))
            continue
        kept.append(frame)
    if not kept:
        return None
    stack, resampled_from = stack[: len(kept)], None
    if stack.shape[1:] != (SIZE, SIZE):
        resampled_from = (int(stack.shape[1]), int(stack.shape[2]))
        stack = _resample(stack)
        notes.append("resampled from {}×{} to 512×512 (bilinear)".format(*resampled_from))
        logger.info("resampled %d slice(s) from %d×%d", len(kept), *resampled_from)
    return Series(
        index=0,
        kind=kind,
        key=series_key,
        pixels=stack,
        order=order,
        slices=tuple(SliceInfo(f.name, f.frame, f.position, f.instance) for f in kept),
        resampled_from=resampled_from,
        notes=tuple(notes),
    )


def _decoded(frames: list[_Frame], pool: DecodePool | None) -> Iterator[Any]:
    """Each frame's pixels, or the exception its decoding raised, in order: from the pool's
    workers when there is one (DICOM series), else, or once it broke, in this thread."""
    done = 0
    if pool is not None and all(f.task is not None for f in frames):
        try:
            for outcome in pool.decode(_decode_frame, [f.task for f in frames]):  # type: ignore[misc]
                yield outcome
                done += 1
            return
        except DecodePoolBroken:
            pass  # logged by the pool; the frames not yet decoded are decoded here
    for frame in frames[done:]:
        try:
            yield frame.load()
        except Exception as e:  # decoders raise many types on corrupt data
            yield e


def _natural(name: str) -> list[int | str]:
    """Natural sort key: IM00010 after IM00009, IM10 after IM9."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _by_name(frame: _Frame) -> tuple[list[int | str], int]:
    return _natural(frame.name), frame.frame or 0


def _order_tiff(frames: list[_Frame]) -> tuple[list[_Frame], str, list[str]]:
    return sorted(frames, key=_by_name), "file name, natural sort; pages in file order", []


def _order_dicom(frames: list[_Frame]) -> tuple[list[_Frame], str, list[str]]:
    """By position along the slice normal (head → feet), else InstanceNumber, else file name."""
    notes = ["SeriesInstanceUID missing: grouped by archive folder"] if frames[0].by_folder else []
    if all(f.position is not None for f in frames):
        frames = sorted(frames, key=lambda f: (-(f.position or 0.0), *_by_instance(f)))
        frames = _drop_duplicates(frames, notes)
        axis = Counter(f.axis for f in frames).most_common(1)[0][0]
        if axis != 2:
            notes.append("not axial: the slices are stacked " + _DIRECTIONS[axis])
        return frames, f"ImagePositionPatient along the slice normal: {_DIRECTIONS[axis]}", notes
    if all(f.instance is not None for f in frames):
        return sorted(frames, key=_by_instance), "InstanceNumber (no ImagePositionPatient)", notes
    return sorted(frames, key=_by_name), "file name, natural sort (no position or instance)", notes


def _by_instance(frame: _Frame) -> tuple[int, list[int | str], int]:
    return frame.instance or 0, *_by_name(frame)


def _drop_duplicates(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Keep the first slice at each position (to 1 µm): lowest InstanceNumber, then name."""
    kept = frames[:1]
    for frame in frames[1:]:
        if round(frame.position or 0.0, 3) != round(kept[-1].position or 0.0, 3):
            kept.append(frame)
    if dropped := len(frames) - len(kept):
        notes.append(f"{dropped} slice(s) at an already seen position dropped")
        logger.info("duplicate positions: %d slice(s) dropped", dropped)
    return kept


def _resample(stack: np.ndarray) -> np.ndarray:
    """Bilinear uint16 [N, H, W] → [N, 512, 512], corners kept (as scipy zoom, order=1)."""
    rows, cols = _interpolation_matrix(stack.shape[1]), _interpolation_matrix(stack.shape[2])
    out = np.empty((len(stack), SIZE, SIZE), dtype=np.uint16)
    for i, image in enumerate(stack):
        out[i] = np.clip(np.rint(rows @ image.astype(np.float32) @ cols.T), 0, 65535)
    return out


def _interpolation_matrix(n: int) -> np.ndarray:
    """[512, n] weights of linear interpolation from n samples onto 512 (ends aligned)."""
    x = np.linspace(0, n - 1, SIZE)
    low = np.minimum(np.floor(x).astype(int), max(n - 2, 0))
    weight = (x - low).astype(np.float32)
    matrix = np.zeros((SIZE, n), dtype=np.float32)
    np.add.at(matrix, (np.arange(SIZE), low), 1 - weight)
    np.add.at(matrix, (np.arange(SIZE), np.minimum(low + 1, n - 1)), weight)
    return matrix


def _nothing_usable(skips: Skips, members: int) -> errors.CovidCTError:
    """The error for an upload without a usable slice; its detail counts the skip reasons."""
    counts = Counter(s.reason for _, s in skips)
    summary = "; skipped: " + ", ".join(f"{n} × {r}" for r, n in counts.most_common())
    detail = f"no usable CT slice among {members} archive file(s)" + (summary if counts else "")
    categories = {category for category, _ in skips}
    error = next((cls for cat, cls in _FAILURES if cat in categories), errors.NoImageError)
    logger.info("ingest: nothing usable (%s); skipped %s", error.type_, dict(counts))
    return error(detail, skipped=dict(counts))
