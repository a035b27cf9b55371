"""`multipart/related; type="application/dicom"` (DICOM PS3.18 section 8.6), parsed as a
stream: each part goes straight to its own file on disk, bounded in size, while the body
arrives; nothing holds the whole request in memory.

The framing is parsed by python-multipart's streaming parser (bounded header count and
size per part). The parts are handed over once the body is complete, so a request whose
body is malformed, cut off or over the upload limit stores nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app import errors

DICOM_MEDIA_TYPE = "application/dicom"
_MAX_HEADERS = 16  # per part: Content-Type, Content-Length, Content-ID, Content-Location ...
_MAX_HEADER_BYTES = 4096
_MAX_BOUNDARY = 200


def stow_boundary(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS body, once its media type is one this service takes:
    multipart/related whose `type` (when given) is application/dicom. Raises
    UnsupportedMediaTypeError (415) or MalformedRequestError (400)."""
    media, params = parse_options_header(content_type or "")
    if media != b"multipart/related":
        raise errors.UnsupportedMediaTypeError(
            'STOW-RS takes multipart/related; type="application/dicom" (DICOM PS3.18 10.5)'
        )
    kind = params.get(b"type", DICOM_MEDIA_TYPE.encode()).decode("latin-1").strip().lower()
    if kind != DICOM_MEDIA_TYPE:
        raise errors.UnsupportedMediaTypeError(
            "only application/dicom parts (DICOM PS3.10 files) are taken here; "
            "metadata and bulk data parts (application/dicom+json, +xml) are not"
        )
    boundary = params.get(b"boundary", b"")
    # RFC 2046 allows 70 characters; Orthanc's DICOMweb client sends 73 (two UUIDs).
    if not 1 <= len(boundary) <= _MAX_BOUNDARY:
        raise errors.MalformedRequestError("the multipart body has no valid boundary parameter")
    return boundary


@dataclass
class ReceivedPart:
    """One part, its bytes in `path` (None when nothing was kept: over `max_bytes`, or not
    application/dicom). The caller owns the file."""

    index: int  # 1-based position in the request
    path: Path | None
    size: int
    content_type: str
    too_large: bool = False


@dataclass
class _Current:
    index: int
    out: BinaryIO | None
    path: Path | None
    size: int = 0
    content_type: str = ""
    too_large: bool = False
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)


class PartReader:
    """Feeds body chunks to the parser; parts that ended are collected in `ready`."""

    def __init__(
        self, boundary: bytes, new_file: Callable[[], tuple[Path, BinaryIO]], max_bytes: int
    ) -> None:
        self._new_file = new_file
        self._max_bytes = max_bytes
        self._count = 0
        self._current: _Current | None = None
        self.ready: list[ReceivedPart] = []
        self.ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._finished,
            },
            max_header_count=_MAX_HEADERS,
            max_header_size=_MAX_HEADER_BYTES,
        )

    def write(self, chunk: bytes) -> None:
        if self.ended:
            return  # the epilogue after the closing delimiter is ignored (RFC 2046)
        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise errors.MalformedRequestError(
                "the multipart/related body could not be parsed"
            ) from e

    def close(self) -> None:
        """Remove the file of a part cut off by the end of the body or an error."""
        if self._current is not None:
            _discard(self._current)
            self._current = None
        for part in self.ready:
            if part.path is not None:
                part.path.unlink(missing_ok=True)
        self.ready.clear()

    # --- parser callbacks ----------------------------------------------------------

    def _begin(self) -> None:
        self._count += 1
        self._current = _Current(self._count, None, None)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.header_value += data[start:end]

    def _header_end(self) -> None:
        current = self._current
        assert current is not None
        if bytes(current.header_field).strip().lower() == b"content-type":
            media, _ = parse_options_header(bytes(current.header_value))
            current.content_type = media.decode("latin-1")
        current.header_field.clear()
        current.header_value.clear()

    def _headers_finished(self) -> None:
        current = self._current
        assert current is not None
        # A part without Content-Type takes the body's `type` (application/dicom).
        if current.content_type in ("", DICOM_MEDIA_TYPE):
            current.path, current.out = self._new_file()

    def _data(self, data: bytes, start: int, end: int) -> None:
        current = self._current
        assert current is not None
        current.size += end - start
        if current.out is None:
            return
        if current.size > self._max_bytes:
            current.too_large = True
            _discard(current)
            return
        current.out.write(data[start:end])

    def _end(self) -> None:
        current = self._current
        assert current is not None
        if current.out is not None:
            current.out.close()
        self.ready.append(
            ReceivedPart(
                current.index,
                current.path,
                current.size,
                current.content_type or DICOM_MEDIA_TYPE,
                current.too_large,
            )
        )
        self._current = None

    def _finished(self) -> None:
        self.ended = True


def _discard(current: _Current) -> None:
    if current.out is not None:
        current.out.close()
        current.out = None
    if current.path is not None:
        current.path.unlink(missing_ok=True)
        current.path = None


async def read_parts(
    chunks: AsyncIterator[bytes],
    boundary: bytes,
    new_file: Callable[[], tuple[Path, BinaryIO]],
    max_bytes: int,
) -> list[ReceivedPart]:
    """Every part of a multipart body, once the whole body has arrived. Raises
    MalformedRequestError when the framing is broken or the body ends before its closing
    delimiter; then (and on any other failure, a client gone or the upload limit) every
    part's file is removed: a request that fails stores nothing."""
    reader = PartReader(boundary, new_file, max_bytes)
    parts: list[ReceivedPart] = []
    try:
        async for chunk in chunks:
            reader.write(chunk)
            parts += reader.ready
            reader.ready.clear()
        if not reader.ended:
            raise errors.MalformedRequestError(
                "the multipart/related body ended before its closing delimiter"
            )
    except BaseException:
        for part in parts:
            if part.path is not None:
                part.path.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return parts


def part_file(directory: Path) -> tuple[Path, BinaryIO]:
    """A new file for one part in `directory` (mode 0600)."""
    fd, name = tempfile.mkstemp(prefix=".part-", suffix=".dcm", dir=directory)
    return Path(name), os.fdopen(fd, "wb")
