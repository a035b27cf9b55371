"""ingest_zip (app/ingest/study.py): members that give nothing are skipped and counted;
when nothing usable is left, the error is chosen by what went wrong."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from app.errors import (
    CorruptMemberError,
    EncryptedMemberError,
    NoImageError,
    TooManySlicesError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from app.ingest import IngestLimits, ingest_zip
from dicom_factory import PHI_NAME, PHI_STRINGS, file_bytes, synthetic_ct, tiff_bytes
from ingest_support import assert_no_leak, ingest
from shared_data import zip_files


def test_non_images_are_skipped_and_counted() -> None:
    image = np.zeros((512, 512), np.uint16)
    study = ingest([
        ("readme.txt", b"hello"),
        (f"{PHI_NAME}.dcm", synthetic_ct(image, pixels=False)),
        ("mr.dcm", synthetic_ct(image, modality="MR")),
        ("__MACOSX/._x.dcm", b"junk"),
        ("scan/.DS_Store", b"junk"),
        ("scan/x.dcm", synthetic_ct(image)),
    ])  # fmt: skip
    assert study.members == 6 and len(study.series) == 1
    reasons = {s.index: s.reason for s in study.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "neither DICOM nor TIFF" in reasons[1] and "without pixel data" in reasons[2]
    assert "not a CT" in reasons[3] and "hidden" in reasons[4] and "hidden" in reasons[5]
    assert not any(planted in str(study.skipped) for planted in PHI_STRINGS)


def test_only_skipped_members_summarise_the_reasons() -> None:
    with pytest.raises(NoImageError) as info:
        ingest([(f"{PHI_NAME}.txt", b"x"), ("b.txt", b"y"), ("c/.DS_Store", b"z")])
    assert "2 × neither DICOM nor TIFF" in info.value.detail
    assert "1 × hidden or operating-system file" in info.value.detail
    assert_no_leak(info.value)


def mpeg2() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((16, 16), np.uint16))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # no decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    return file_bytes(ds)


def encrypted(archive: bytes) -> bytes:
    data = bytearray(archive)
    data[data.find(b"PK\x03\x04") + 6] |= 1
    data[data.find(b"PK\x01\x02") + 8] |= 1
    return bytes(data)


def test_the_error_names_the_first_of_encrypted_syntax_image_corrupt() -> None:
    members = {
        "syntax": ("s.dcm", mpeg2()),
        "image": ("i.tif", tiff_bytes(np.zeros((8, 8), np.uint8))),
        "corrupt": ("c.dcm", synthetic_ct(np.zeros((64, 64), np.uint16))[:-100]),
        "other": ("o.txt", b"text"),
    }
    order = [
        ("syntax", UnsupportedTransferSyntaxError),
        ("image", UnsupportedImageError),
        ("corrupt", CorruptMemberError),
        ("other", NoImageError),
    ]
    for i, (_, error) in enumerate(order):
        with pytest.raises(error):
            ingest([members[kind] for kind, _ in order[i:]])
    with pytest.raises(EncryptedMemberError):
        ingest_zip(encrypted(zip_files(list(members.values()))), IngestLimits())


def test_slices_over_the_total_are_refused_while_reading() -> None:
    files = [(f"{i}.dcm", synthetic_ct(np.zeros((8, 8), np.uint16), z=i)) for i in range(4)]
    with pytest.raises(TooManySlicesError, match="more than 3 slices"):
        ingest(files, max_slices_total=3)
    assert len(ingest(files, max_slices_total=4).series[0].slices) == 4
