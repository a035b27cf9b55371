"""One instance received over STOW-RS, checked as the zip route checks a DICOM member
(app/dicomweb/instances.py): what is taken, and the failure reason of what is not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian

from app.dicomweb import FailureReason, InstanceRefused, check_instance
from app.ingest import IngestLimits
from shared_data import P002, needs_data
from stow_support import ct_instance, repaired_p002, uid

LIMITS = IngestLimits()
STUDY = uid("instances", "study")


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "part.dcm"
    path.write_bytes(data)
    return path


def _refused(tmp_path: Path, data: bytes, limits: IngestLimits = LIMITS) -> InstanceRefused:
    with pytest.raises(InstanceRefused) as refused:
        check_instance(_file(tmp_path, data), 1, limits)
    return refused.value


def test_a_ct_slice_is_taken_with_its_identifiers(tmp_path: Path) -> None:
    data = ct_instance(STUDY, 7)
    checked = check_instance(_file(tmp_path, data), 1, LIMITS)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (checked.study_uid, checked.sop_instance_uid, checked.sop_class_uid) == (
        STUDY,
        ds.SOPInstanceUID,
        "1.2.840.10008.5.1.4.1.1.2",
    )
    assert (checked.patient_id, checked.frames) == ("MRN4711XQ", 1)


@needs_data
def test_p002_with_valid_uids_is_taken_and_as_published_is_not(tmp_path: Path) -> None:
    [repaired] = repaired_p002(tmp_path / "rep", ["IM0060.dcm"])
    assert check_instance(repaired, 1, LIMITS).frames == 1
    # COVID-CT-MD's de-identification emptied SOP Instance UID: no instance to reference.
    refused = _refused(tmp_path, (P002 / "IM0060.dcm").read_bytes())
    assert (refused.reason, refused.sop_instance_uid) == (FailureReason.CANNOT_UNDERSTAND, "")


def _rewritten(data: bytes, **changes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = changes.pop("syntax", None)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([bytes(ds.PixelData)])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Modality": "MR"}, FailureReason.SOP_CLASS_NOT_SUPPORTED),
        (
            {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
            FailureReason.SOP_CLASS_NOT_SUPPORTED,
        ),
        ({"PixelData": None}, FailureReason.SOP_CLASS_NOT_SUPPORTED),
        ({"PhotometricInterpretation": "RGB"}, FailureReason.SOP_CLASS_NOT_SUPPORTED),
        ({"SOPInstanceUID": "not-a-uid"}, FailureReason.CANNOT_UNDERSTAND),
        ({"StudyInstanceUID": None}, FailureReason.CANNOT_UNDERSTAND),
        ({"NumberOfFrames": 3000}, FailureReason.OUT_OF_RESOURCES),  # over a series' slices
    ],
)
def test_what_the_zip_route_skips_fails_with_a_reason(
    tmp_path: Path, changes: dict[str, object], reason: FailureReason
) -> None:
    assert _refused(tmp_path, _rewritten(ct_instance(STUDY, 1), **changes)).reason == reason


def test_a_transfer_syntax_without_decoder_fails_c122(tmp_path: Path) -> None:
    mpeg2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile: no decoder
    data = _rewritten(ct_instance(STUDY, 1), syntax=mpeg2)
    assert _refused(tmp_path, data).reason == FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED


def test_a_deflated_data_set_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    # pydicom inflates a deflated data set whole, without a bound: 1 MB of zeros here
    # deflates to 1 kB; a crafted one would inflate to gigabytes. Refused from the meta
    # header alone.
    values = np.zeros((1024, 512), np.uint16)
    ds = pydicom.dcmread(io.BytesIO(ct_instance(STUDY, 1)))
    ds.Rows, ds.Columns, ds.PixelData = 1024, 512, values.tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert len(out.getvalue()) < 20_000
    refused = _refused(tmp_path, out.getvalue())
    assert refused.reason == FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED
    assert refused.sop_instance_uid == ds.SOPInstanceUID  # from the meta header


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain text, not DICOM",
        b"\0" * 128 + b"DICM" + b"\xff" * 64,  # a preamble, then garbage
        ct_instance(STUDY, 1)[:300],  # cut inside the data set
        ct_instance(STUDY, 1)[132:],  # no preamble: not a PS3.10 file
    ],
)
def test_what_is_not_a_dicom_file_fails_c000(tmp_path: Path, data: bytes) -> None:
    assert _refused(tmp_path, data).reason == FailureReason.CANNOT_UNDERSTAND
