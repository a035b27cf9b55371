"""multipart/related parsed as a stream (app/dicomweb/multipart.py) and the STOW-RS answer
(app/dicomweb/response.py), against bodies and documents written here by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app import errors
from app.dicomweb import (
    FailureReason,
    InstanceOutcome,
    ReceivedPart,
    response_body,
    response_status,
)
from app.dicomweb.multipart import part_file, read_parts, stow_boundary
from stow_support import BOUNDARY, multipart


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom"; boundary=abc',
        "Multipart/Related; boundary=abc; type=application/dicom",
        "multipart/related; boundary=abc",  # no type: the parts say what they are
    ],
)
def test_stow_media_types_taken(content_type: str) -> None:
    assert stow_boundary(content_type) == b"abc"


def test_orthanc_s_long_boundary_is_taken() -> None:
    # Orthanc's DICOMweb client sends two UUIDs: 73 characters, over RFC 2046's 70.
    boundary = "f4374590-b589-4fa6-a95c-7c0cd44ceceb-f4374590-b589-4fa6-a95c-7c0cd44ceceb"
    assert stow_boundary(f"multipart/related; boundary={boundary}") == boundary.encode()


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("multipart/form-data; boundary=abc", errors.UnsupportedMediaTypeError),
        ("application/dicom", errors.UnsupportedMediaTypeError),
        (None, errors.UnsupportedMediaTypeError),
        (
            'multipart/related; type="application/dicom+json"; boundary=abc',
            errors.UnsupportedMediaTypeError,
        ),
        ('multipart/related; type="application/dicom"', errors.MalformedRequestError),
        ('multipart/related; boundary="' + "b" * 201 + '"', errors.MalformedRequestError),
    ],
)
def test_other_bodies_are_refused(content_type: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        stow_boundary(content_type)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _read(
    body: bytes, tmp_path: Path, size: int = 7, max_bytes: int = 1 << 20
) -> list[ReceivedPart]:
    return asyncio.run(
        read_parts(_chunks(body, size), BOUNDARY.encode(), lambda: part_file(tmp_path), max_bytes)
    )


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_parts_arrive_whole_whatever_the_chunking(tmp_path: Path, chunk: int) -> None:
    payloads = [b"first\r\n--not-the-boundary", b"", bytes(range(256)) * 40]
    parts = _read(multipart(payloads), tmp_path, size=chunk)
    assert [p.path.read_bytes() for p in parts] == payloads
    assert [(p.index, p.size, p.content_type) for p in parts] == [
        (i, len(d), "application/dicom") for i, d in enumerate(payloads, start=1)
    ]


def test_an_oversized_part_is_marked_and_not_kept(tmp_path: Path) -> None:
    parts = _read(multipart([b"x" * 100, b"small"]), tmp_path, max_bytes=50)
    assert (parts[0].too_large, parts[0].path, parts[0].size) == (True, None, 100)
    assert parts[1].path is not None and parts[1].path.read_bytes() == b"small"


def test_parts_of_another_type_are_not_kept(tmp_path: Path) -> None:
    parts = _read(multipart([b"{}"], part_type="application/dicom+json"), tmp_path)
    assert (parts[0].content_type, parts[0].path) == ("application/dicom+json", None)


@pytest.mark.parametrize(
    "body",
    [
        multipart([b"abc"])[:-20],  # cut before the closing delimiter
        b"no multipart here at all",
        b"--" + BOUNDARY.encode() + b"\r\n" + b"X: y\r\n" * 40 + b"\r\nabc",  # too many headers
    ],
)
def test_a_broken_body_fails_and_leaves_no_file(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(errors.MalformedRequestError):
        _read(body, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- the answer: PS3.18 10.5.3 and Annex I ------------------------------------------------

OK = InstanceOutcome("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", None, "job")
BAD = InstanceOutcome("1.2.840.10008.5.1.4.1.1.2", "1.2.3.5", FailureReason.CANNOT_UNDERSTAND)


def test_all_stored_is_200_with_referenced_sop_sequence_only() -> None:
    assert response_status([OK, OK]) == 200
    assert response_body([OK]) == {
        "00081190": {"vr": "UR"},  # Retrieve URL: type 2, empty
        "00081199": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                    "00081190": {"vr": "UR"},
                }
            ],
        },
    }


def test_some_failed_is_202_none_stored_is_409() -> None:
    assert response_status([OK, BAD]) == 202
    assert response_status([BAD]) == 409
    body = response_body([BAD])
    assert "00081199" not in body
    assert body["00081198"]["Value"] == [
        {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": ["1.2.3.5"]},
            "00081197": {"vr": "US", "Value": [0xC000]},
        }
    ]


def test_failure_reasons_are_the_standard_s_values() -> None:
    # PS3.18 Table I.2-2, in decimal as DICOM JSON carries them.
    assert FailureReason.OUT_OF_RESOURCES == 42752
    assert FailureReason.CANNOT_UNDERSTAND == 49152
    assert FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED == 49442
    assert FailureReason.PROCESSING_FAILURE == 272
    assert FailureReason.SOP_CLASS_NOT_SUPPORTED == 290
    assert 0xC000 <= FailureReason.STUDY_UID_MISMATCH <= 0xCFFF  # "cannot understand" range
