"""ingest_zip: a zipped upload → a Study of ordered uint16 series in the stored-value domain.

Members are read from the archive in memory, never extracted to disk. Every slice leaves
as uint16 512×512 holding HU + 1024 clipped at 0 (the paper's Siemens domain). A member
that gives no slice is skipped with a reason; the request fails only when nothing usable
is left. Members are named by their 1-based index among the archive's files: names and
tag values may be patient data and never reach logs or errors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import BinaryIO

from app import errors
from app.domain import Study
from app.ingest.archive import Member, check_archive, is_nested_archive, open_zip, read_members
from app.ingest.dicom import read_dicom
from app.ingest.frames import Category, Frame, Skip, Skipped
from app.ingest.limits import IngestLimits
from app.ingest.pool import DecodePool
from app.ingest.series import build_series, check_groups, group
from app.ingest.tiff import is_tiff, read_tiff

logger = logging.getLogger(__name__)

# When nothing usable is left, the first category present picks the error; without any of
# them it is NoImageError.
_FAILURES: tuple[tuple[Category, type[errors.CovidCTError]], ...] = (
    ("encrypted", errors.EncryptedMemberError),
    ("syntax", errors.UnsupportedTransferSyntaxError),
    ("image", errors.UnsupportedImageError),
    ("corrupt", errors.CorruptMemberError),
)


def ingest_zip(
    archive: bytes | BinaryIO, limits: IngestLimits, decode_pool: DecodePool | None = None
) -> Study:
    """Read a zip of DICOM and/or TIFF files into series of uint16 [N, 512, 512] HU + 1024.

    With a `decode_pool`, DICOM pixel data is decoded in its worker processes. Call
    `configure_libraries()` once before (the service does at start-up).

    Raises NotAZipError, TooManyMembersError, ZipBombError, TooManySlicesError or
    MixedSliceSizesError; and, when no usable slice is left, EncryptedMemberError,
    UnsupportedTransferSyntaxError, UnsupportedImageError, CorruptMemberError or
    NoImageError (in that order of precedence), whose detail counts the skip reasons.
    """
    skipped: list[Skipped] = []
    frames: list[Frame] = []
    with open_zip(archive) as zf:
        infos = check_archive(zf, limits)
        for member in read_members(zf, infos, limits):
            if isinstance(member, Skipped):
                skipped.append(member)
                continue
            try:
                frames += _read_member(member, limits)
            except Skip as s:
                logger.debug("member %d skipped: %s", member.index, s.reason)
                skipped.append(Skipped.of(member.index, s))
            if len(frames) > limits.max_slices_total:
                raise errors.TooManySlicesError(
                    f"the archive holds more than {limits.max_slices_total} slices (the "
                    "limit, counted before duplicates are dropped)"
                )
    groups = group(frames)
    check_groups(groups, limits)
    built = []
    for key, members in groups:
        series, lost = build_series(key, members, decode_pool)
        skipped += lost
        if series is not None:
            built.append(series)
    if not built:
        raise _nothing_usable(skipped, len(infos))
    numbered = tuple(dataclasses.replace(s, index=i) for i, s in enumerate(built, start=1))
    n_slices = sum(len(s.slices) for s in numbered)
    reasons = Counter(s.member.reason for s in skipped)
    message = "ingest: %d member(s) → %d series, %d slice(s); skipped %s"
    logger.info(message, len(infos), len(numbered), n_slices, dict(reasons) or "none")
    return Study(series=numbered, skipped=tuple(s.member for s in skipped), members=len(infos))


def _read_member(member: Member, limits: IngestLimits) -> list[Frame]:
    """DICOM ('DICM' at 128, else a forced read) or TIFF (by magic): header facts only."""
    if is_nested_archive(member.data):
        raise Skip("other", "nested archive (archives inside the upload are not opened)")
    try:
        if is_tiff(member.data):
            return read_tiff(member.index, member.name, member.data, limits)
        return read_dicom(member.index, member.name, member.data, limits)
    except (Skip, errors.CovidCTError):
        raise
    except Exception as e:  # malformed input makes pydicom and tifffile raise many types
        logger.warning("member %d could not be parsed (%s)", member.index, type(e).__name__)
        raise Skip("corrupt", "header could not be parsed") from e


def _nothing_usable(skipped: list[Skipped], members: int) -> errors.CovidCTError:
    """The error for an upload without a usable slice; its detail counts the skip reasons."""
    counts = Counter(s.member.reason for s in skipped)
    summary = "; skipped: " + ", ".join(f"{n} × {r}" for r, n in counts.most_common())
    detail = f"no usable CT slice among {members} archive file(s)" + (summary if counts else "")
    categories = {s.category for s in skipped}
    error = next((cls for cat, cls in _FAILURES if cat in categories), errors.NoImageError)
    logger.info("ingest: nothing usable (%s); skipped %s", error.type_, dict(counts))
    return error(detail, skipped=dict(counts))
