"""The zip archive: opened in memory (never extracted to disk), its declared sizes and
layout checked against the limits before anything is decompressed, and each member read
with a bounded read, whatever its headers say."""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from app import errors
from app.domain import SkippedMember
from app.ingest.frames import Skipped
from app.ingest.limits import IngestLimits

logger = logging.getLogger(__name__)

_RATIO_MIN_BYTES = 1 << 20  # smaller members are bounded by the total size limit alone
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
# Only these are read: Python bounds their decompression per read; bzip2 and LZMA inflate a
# whole compressed chunk at once, whatever the size asked for.
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name
# Archives inside the archive (zip, gzip, bzip2, xz, 7z, rar) are never opened.
_ARCHIVE_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!",
)  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One member's bytes; `index` is 1-based among the archive's files (names may be
    patient data: logs and errors name members by index)."""

    index: int
    name: str
    data: bytes


def open_zip(archive: bytes | BinaryIO) -> zipfile.ZipFile:
    source = io.BytesIO(archive) if isinstance(archive, bytes | bytearray | memoryview) else archive
    try:
        return zipfile.ZipFile(source)
    except Exception as e:  # crafted archives make zipfile raise many types
        raise errors.NotAZipError("the upload is not a readable zip archive") from e


def check_archive(zf: zipfile.ZipFile, limits: IngestLimits) -> list[zipfile.ZipInfo]:
    """The archive's files (folders left out), once what it declares is within the limits."""
    infos = [info for info in zf.infolist() if not info.is_dir()]
    if len(infos) > limits.max_members:
        raise errors.TooManyMembersError(
            f"the archive holds {len(infos)} files; the limit is {limits.max_members}"
        )
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_uncompressed_bytes:
        raise errors.ZipBombError(
            f"the archive declares {declared} uncompressed bytes; "
            f"the limit is {limits.max_uncompressed_bytes}"
        )
    _check_layout(zf)
    limit = limits.max_compression_ratio
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


def read_members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits
) -> Iterator[Member | Skipped]:
    """Each member's bytes, or why it was skipped, in archive order; each read is bounded
    by the member's declared size and by what is left of the total budget."""
    budget = limits.max_uncompressed_bytes
    for index, info in enumerate(infos, start=1):
        parts = info.filename.split("/")
        if parts[0] == "__MACOSX" or parts[-1].startswith(".") or parts[-1].lower() in _JUNK_NAMES:
            yield Skipped("other", SkippedMember(index, "hidden or operating-system file"))
            continue
        if info.flag_bits & 0x1:
            yield Skipped("encrypted", SkippedMember(index, "encrypted archive member"))
            continue
        if info.compress_type not in _METHODS:
            reason = "compression method not supported (only stored and deflated)"
            yield Skipped("corrupt", SkippedMember(index, reason))
            continue
        limit = min(info.file_size, budget)
        try:
            with zf.open(info) as member:
                data = member.read(limit + 1)
        except Exception as e:  # zipfile, zlib: many types on corrupt or crafted members
            logger.warning("member %d could not be decompressed (%s)", index, type(e).__name__)
            yield Skipped("corrupt", SkippedMember(index, "member could not be decompressed"))
            continue
        if len(data) > limit:
            raise errors.ZipBombError(f"archive member {index} expands beyond its declared size")
        budget -= len(data)
        yield Member(index, info.filename, data)


def is_nested_archive(data: bytes) -> bool:
    """An archive inside the archive (a DICOM preamble may start with any bytes)."""
    return data.startswith(_ARCHIVE_MAGIC) and data[128:132] != b"DICM"
