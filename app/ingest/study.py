"""ingest_zip: a zipped upload → a Study of ordered uint16 series in the stored-value domain.

In two steps for a caller that overlaps decoding with its own work: `open_study` reads
every header and checks every limit (nothing is decoded; every refusal but "no usable
slice" happens here), then `StudyIngest.series()` decodes one series at a time.

Members are read from the archive in memory, never extracted to disk. Every slice leaves
as uint16 512×512 holding HU + 1024 clipped at 0 (the paper's Siemens domain). A member
that gives no slice is skipped with a reason; the request fails only when nothing usable
is left. Members are named by their 1-based index among the archive's files: names and
tag values may be patient data and never reach logs or errors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from collections.abc import Iterator
from functools import partial
from typing import BinaryIO

from app import errors
from app.domain import Series, Study
from app.ingest.archive import Member, check_archive, is_nested_archive, open_zip, read_members
from app.ingest.dicom import decode_frame, read_dicom
from app.ingest.frames import Category, Frame, Skip, Skipped
from app.ingest.limits import IngestLimits
from app.ingest.pool import DecodePool
from app.ingest.series import SeriesPlan, check_groups, decode_series, group, plan_series
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
    ingest = open_study(archive, limits, decode_pool)
    for _ in ingest.series():
        pass
    return ingest.study()


def open_study(
    archive: bytes | BinaryIO, limits: IngestLimits, decode_pool: DecodePool | None = None
) -> StudyIngest:
    """The first half of `ingest_zip`: read every member's header, group, order and check
    every limit, decoding no pixel. Raises every error `ingest_zip` raises except the
    no-usable-slice ones, which only `StudyIngest.study()` can know. Once this returned,
    the upload is refused for no other reason than that."""
    skipped: list[Skipped] = []
    frames: list[Frame] = []
    with open_zip(archive) as zf:
        infos = check_archive(zf, limits)
        for member in read_members(zf, infos, limits):
            if isinstance(member, Skipped):
                skipped.append(member)
                continue
            try:
                read = _read_member(member, limits)
                frames += read if decode_pool is None else [_lean(f) for f in read]
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
    plans = [plan_series(key, members) for key, members in groups]
    return StudyIngest(plans, skipped, len(infos), decode_pool)


class StudyIngest:
    """An upload whose headers are read and whose limits hold (`open_study`): its series
    are decoded one at a time by `series()`, so that a caller can work on one series while
    the next decodes; `study()` then gives the Study `ingest_zip` would have given."""

    def __init__(
        self,
        plans: list[SeriesPlan],
        skipped: list[Skipped],
        members: int,
        decode_pool: DecodePool | None,
    ) -> None:
        self._plans = deque(plans)
        self._skipped = skipped
        self._members = members
        self._pool = decode_pool
        self._built: list[Series] = []

    def series(self) -> Iterator[Series]:
        """Decode each series in turn, in the Study's order, with its final 1-based index.
        A series whose frames all fail to decode is left out (its members are skipped)."""
        while self._plans:
            plan = self._plans.popleft()  # its frames (their pixel data) go with it
            series, lost = decode_series(plan, self._pool)
            del plan
            self._skipped += lost
            if series is not None:
                series = dataclasses.replace(series, index=len(self._built) + 1)
                self._built.append(series)
                yield series

    def study(self) -> Study:
        """Everything ingest got, once `series()` is exhausted. Raises the no-usable-slice
        error (see `ingest_zip`) when no series was built."""
        if self._plans:
            raise RuntimeError("StudyIngest.study() called before every series was decoded")
        if not self._built:
            raise _nothing_usable(self._skipped, self._members)
        built = tuple(self._built)
        n_slices = sum(len(s.slices) for s in built)
        reasons = Counter(s.member.reason for s in self._skipped)
        message = "ingest: %d member(s) → %d series, %d slice(s); skipped %s"
        logger.info(message, self._members, len(built), n_slices, dict(reasons) or "none")
        skipped = tuple(s.member for s in self._skipped)
        return Study(series=built, skipped=skipped, members=self._members)


def _lean(frame: Frame) -> Frame:
    """A DICOM frame bound for the decode pool keeps its decode task (what a worker gets:
    the Pixel Data value and its description) and not the parsed dataset: should the pool
    break, this thread decodes the task as a worker would."""
    if frame.task is None:
        return frame
    return dataclasses.replace(frame, load=partial(decode_frame, *frame.task))


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
