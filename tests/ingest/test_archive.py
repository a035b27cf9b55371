"""The archive (app/ingest/archive.py): limits and zip-bomb checks before anything is
decompressed, bounded reads, and the members that are never read."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest

from app.errors import (
    CorruptMemberError,
    EncryptedMemberError,
    NoImageError,
    NotAZipError,
    TooManyMembersError,
    ZipBombError,
)
from app.ingest import IngestLimits, ingest_zip
from dicom_factory import synthetic_ct
from ingest_support import ingest
from shared_data import zip_files

LIMITS = IngestLimits()


def empty_slice() -> bytes:
    return synthetic_ct(np.zeros((8, 8), np.uint16))


def zeros_zip(size: int) -> bytes:
    """A deflated member of `size` zero bytes, written without holding it in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("bomb.dcm", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return buf.getvalue()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the members ingest opens (decompresses)."""
    names: list[str] = []
    real = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, mode: str = "r", **kwargs: object) -> object:
        if mode == "r":  # not the writes that build the test archives
            names.append(getattr(name, "filename", str(name)))
        return real(self, name, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    yield names


def test_not_a_zip() -> None:
    for data in (b"", b"not a zip at all", empty_slice()):
        with pytest.raises(NotAZipError):
            ingest_zip(data, LIMITS)


def test_empty_zip_and_file_object() -> None:
    with pytest.raises(NoImageError, match="no usable CT slice among 0"):
        ingest_zip(zip_files([]), LIMITS)
    study = ingest_zip(io.BytesIO(zip_files([("x.dcm", empty_slice())])), LIMITS)
    assert len(study.series) == 1 and study.members == 1


def test_too_many_members_is_refused_before_any_is_opened(opened: list[str]) -> None:
    files = [(f"{i}.dcm", empty_slice()) for i in range(4)]
    with pytest.raises(TooManyMembersError, match="4 files; the limit is 3"):
        ingest(files, max_members=3)
    assert opened == []
    assert len(ingest(files, max_members=4).series) == 1


def test_zip_bomb_is_refused_before_expanding(opened: list[str]) -> None:
    bomb = zeros_zip(200 << 20)
    assert len(bomb) < 1 << 20
    with pytest.raises(ZipBombError, match="fold"):
        ingest_zip(bomb, LIMITS)
    with pytest.raises(ZipBombError, match="declares"):
        ingest_zip(bomb, IngestLimits(max_uncompressed_bytes=100 << 20))
    assert opened == []  # refused from the central directory alone


def test_lying_sizes_cannot_expand() -> None:
    """A header that understates the size: the read stops at the declared size."""
    bomb = bytearray(zeros_zip(50 << 20))
    local, central = bomb.find(b"PK\x03\x04"), bomb.find(b"PK\x01\x02")
    struct.pack_into("<I", bomb, local + 22, 1000)  # uncompressed size, local header
    struct.pack_into("<I", bomb, central + 24, 1000)  # and central directory
    tracemalloc.start()
    try:
        with pytest.raises(CorruptMemberError):
            ingest_zip(bytes(bomb), LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the member would expand to 50 MiB


def test_encrypted_members() -> None:
    data = bytearray(zip_files([("x.dcm", empty_slice())]))
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 6] |= 1  # general purpose flag: encrypted
    data[central + 8] |= 1
    with pytest.raises(EncryptedMemberError):
        ingest_zip(bytes(data), LIMITS)


def test_members_never_read(opened: list[str]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__MACOSX/._a.dcm", b"junk")
        zf.writestr("scan/.DS_Store", b"junk")
        zf.writestr("scan/Thumbs.db", b"junk")
        zf.writestr("scan/b.dcm", empty_slice(), compress_type=zipfile.ZIP_BZIP2)
        zf.writestr("scan/a.dcm", empty_slice())
    study = ingest_zip(buf.getvalue(), LIMITS)
    assert [s.index for s in study.skipped] == [1, 2, 3, 4]
    assert [s.reason for s in study.skipped][:3] == ["hidden or operating-system file"] * 3
    assert "compression method not supported" in study.skipped[3].reason
    assert opened == ["scan/a.dcm"]


def test_a_nested_archive_is_not_opened() -> None:
    inner = zip_files([("a.dcm", empty_slice())])
    with pytest.raises(NoImageError, match="nested archive"):
        ingest([("inner.zip", inner)])
