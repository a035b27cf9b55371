"""Ingest: zip → ordered series of uint16 [N, 512, 512] stored values (HU + 1024)."""

from __future__ import annotations

import io
import logging
import random
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from app.domain import Study
from app.errors import (
    CorruptMemberError,
    CovidCTError,
    EncryptedMemberError,
    MixedSliceSizesError,
    NoImageError,
    NotAZipError,
    TooManyMembersError,
    TooManySlicesError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
    ZipBombError,
)
from app.ingest import ingest_zip
from app.settings import Settings
from shared_data import NORMAL002, P002, VARIANTS, needs_data, zip_dirs, zip_files

SETTINGS = Settings()
PLANTED = "DOE^JOHN"  # a patient name planted in member names and tags: must never leak
TCGA = VARIANTS / "tcga-luad-single-slices"


def ingest(files: list[tuple[str, bytes | Path]], **limits: object) -> Study:
    settings = SETTINGS.model_copy(update=limits) if limits else SETTINGS
    return ingest_zip(zip_files(files), settings)


def stored(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def ct(
    values: np.ndarray,
    *,
    intercept: str = "-1024",
    slope: str = "1",
    z: float | None = 0.0,
    uid: str = "1.2.826.0.1.3680043.8.498.1",
    instance: int | None = 1,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    bits: int = 16,
    pixels: bool = True,
) -> bytes:
    """A synthetic CT slice as DICOM file bytes; `values` are the stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PLANTED, PLANTED
    ds.Modality, ds.ImageType, ds.SeriesInstanceUID = modality, list(image_type), uid
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = values.shape
    signed = values.dtype.kind == "i"
    ds.BitsAllocated = bits
    ds.BitsStored = 16 if signed else 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if pixels:
        ds.PixelData = values.astype({8: np.uint8, 16: values.dtype}[bits]).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def hu_image(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """HU values from air to bone."""
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


def tiff(values: np.ndarray, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, **kwargs)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def no_patient_data_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert PLANTED not in caplog.text


def assert_no_leak(error: CovidCTError) -> None:
    assert PLANTED not in error.detail and PLANTED not in str(error.extra)


# --- real series ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def p002() -> Study:
    if not P002.is_dir():
        pytest.skip(f"real CT fixtures not found at {P002}")
    return ingest_zip(zip_dirs(P002), SETTINGS)


@needs_data
def test_p002_is_one_series_in_head_to_feet_order(p002: Study) -> None:
    (series,) = p002.series
    assert (series.index, series.kind, len(series.slices)) == (1, "dicom", 133)
    assert [s.source for s in series.slices] == [f"P002/IM{i:04d}.dcm" for i in range(1, 134)]
    positions = np.array([s.position_mm for s in series.slices])
    assert np.all(np.diff(positions) < 0)
    assert positions[0] == pytest.approx(-173.7) and positions[-1] == pytest.approx(-437.7)
    assert "head → feet" in series.order
    assert series.pixels.dtype == np.uint16 and series.pixels.shape == (133, 512, 512)
    assert series.resampled_from is None and p002.skipped == () and p002.members == 133


@needs_data
@pytest.mark.parametrize("i", [0, 66, 132])
def test_p002_pixels_are_the_stored_values(p002: Study, i: int) -> None:
    # RescaleIntercept −1024, slope 1: the stored values already are HU + 1024.
    expected = stored(P002 / f"IM{i + 1:04d}.dcm")
    np.testing.assert_array_equal(p002.series[0].pixels[i], expected)


def test_gdcm_is_never_chosen_even_when_installed() -> None:
    """GDCM aborts the process on some crafted JPEG streams: ingest takes it out of pydicom."""
    pytest.importorskip("gdcm", reason="python-gdcm not installed (then nothing to take out)")
    from pydicom.uid import AllTransferSyntaxes

    for uid in AllTransferSyntaxes:
        try:
            plugins = list(get_decoder(uid).available_plugins)
        except NotImplementedError:
            continue
        assert "gdcm" not in plugins, uid.name
    assert list(get_decoder(JPEGLosslessSV1).available_plugins) == ["pylibjpeg"]


@needs_data
def test_shuffled_names_and_order_keep_the_geometric_order(p002: Study) -> None:
    files = sorted(P002.glob("*.dcm"))
    names = [f"scan/{n:05d}.dcm" for n in random.Random(1).sample(range(10_000), len(files))]
    members = list(zip(names, files, strict=True))
    random.Random(2).shuffle(members)
    study = ingest(members)
    original = dict(zip(names, (f.name for f in files), strict=True))
    (series,) = study.series
    assert [original[s.source] for s in series.slices] == [f.name for f in files]
    np.testing.assert_array_equal(series.pixels, p002.series[0].pixels)


@needs_data
def test_tiff_copy_gives_the_same_pixels_in_natural_order(p002: Study) -> None:
    pixels = p002.series[0].pixels
    members = [
        (f"P002_tiff/IM{i + 1:05d}.tif", tiff(image, compression="zlib" if i % 10 == 0 else None))
        for i, image in enumerate(pixels)
    ]
    random.Random(3).shuffle(members)
    (series,) = ingest(members).series
    assert (series.kind, series.key) == ("tiff", "P002_tiff")
    names = [s.source for s in series.slices]
    assert names[8:10] == ["P002_tiff/IM00009.tif", "P002_tiff/IM00010.tif"]
    assert names == [f"P002_tiff/IM{i:05d}.tif" for i in range(1, 134)]
    np.testing.assert_array_equal(series.pixels, pixels)


@needs_data
def test_two_patients_give_two_series() -> None:
    study = ingest_zip(zip_dirs(P002, NORMAL002), SETTINGS)
    assert [s.index for s in study.series] == [1, 2]
    assert sorted(len(s.slices) for s in study.series) == [133, 167]
    assert len({s.key for s in study.series}) == 2


@needs_data
def test_normal002_is_ordered_head_to_feet() -> None:
    (series,) = ingest_zip(zip_dirs(NORMAL002), SETTINGS).series
    assert [s.source for s in series.slices][:2] == ["normal002/IM0001.dcm", "normal002/IM0002.dcm"]
    assert np.all(np.diff([s.position_mm for s in series.slices]) < 0)


# --- dicom-variants ----------------------------------------------------------------


def peaks(image: np.ndarray) -> tuple[int, int]:
    """Histogram peaks: air (1…200) and soft tissue (1000…1200), in stored values."""
    counts = np.bincount(image.ravel(), minlength=1200)
    return int(np.argmax(counts[1:200]) + 1), int(np.argmax(counts[1000:1200]) + 1000)


@needs_data
@pytest.mark.parametrize(
    "name",
    [
        "tcga-luad-single-slices/ID_0052.dcm",  # intercept 0: stores HU
        "chest-jpeg2000-intercept0.dcm",  # intercept 0, JPEG 2000
        "tcga-luad-single-slices/ID_0051.dcm",  # intercept −1024
        "tcga-luad-single-slices/ID_0000.dcm",  # intercept '-01.024000E+03'
        "tcga-luad-single-slices/ID_0057.dcm",  # slope 1.0002441
    ],
)
def test_variants_land_in_the_stored_value_domain(name: str) -> None:
    (series,) = ingest([(Path(name).name, VARIANTS / name)]).series
    air, soft_tissue = peaks(series.pixels[0])
    assert 0 < air <= 60 and 1040 <= soft_tissue <= 1100
    assert series.pixels.max() < 5000


@needs_data
@pytest.mark.parametrize(
    ("name", "intercept"),
    [("chest-jpeg2000-intercept0.dcm", 0), ("chest-jpeg-ls-near-lossless.dcm", -1024)],
)
def test_compressed_variants_decode_into_the_domain(name: str, intercept: int) -> None:
    (series,) = ingest([(name, VARIANTS / name)]).series
    expected = np.clip(stored(VARIANTS / name).astype(int) + intercept + 1024, 0, None)
    np.testing.assert_array_equal(series.pixels[0], expected)


@needs_data
def test_same_image_twice_keeps_one_slice_with_a_note() -> None:
    study = ingest([(n, TCGA / n) for n in ("ID_0006.dcm", "ID_0003.dcm")])
    (series,) = study.series  # same SeriesInstanceUID and position
    assert [s.source for s in series.slices] == ["ID_0003.dcm"]  # same instance: by name
    assert any("dropped" in note for note in series.notes)


@needs_data
def test_enhanced_ct_gives_one_slice_per_frame_head_to_feet() -> None:
    (series,) = ingest([("e.dcm", VARIANTS / "enhanced-ct-2-frames.dcm")]).series
    # Orientation (−1,0,0)/(0,1,0): the normal points to the feet; frame 1 is higher.
    assert [(s.frame, s.position_mm) for s in series.slices] == [(1, -149.0), (0, -159.0)]
    raw = pydicom.dcmread(VARIANTS / "enhanced-ct-2-frames.dcm").pixel_array
    np.testing.assert_array_equal(series.pixels, raw[::-1])  # intercept −1024 in the groups


@needs_data
def test_localizer_is_skipped_with_a_reason() -> None:
    topogram = VARIANTS / "chest-topogram-400x512.dcm"
    study = ingest([("t.dcm", topogram), ("a.dcm", TCGA / "ID_0000.dcm")])
    assert len(study.series) == 1
    assert [(s.index, "localizer" in s.reason) for s in study.skipped] == [(1, True)]
    with pytest.raises(NoImageError, match="localizer"):
        ingest([("t.dcm", topogram)])


@needs_data
def test_abdomen_without_series_uid_is_one_series_by_folder() -> None:
    folder = VARIANTS / "abdomen-no-lung-series"
    (series,) = ingest([(f"abdomen/{p.name}", p) for p in sorted(folder.glob("*.dcm"))]).series
    assert (series.key, len(series.slices)) == ("abdomen", 20)
    assert np.all(np.diff([s.position_mm for s in series.slices]) < 0)
    assert any("SeriesInstanceUID missing" in note for note in series.notes)


@needs_data
def test_all_variants_together() -> None:
    files = sorted(VARIANTS.rglob("*.dcm"))
    study = ingest([(str(p.relative_to(VARIANTS)), p) for p in files])
    # 16 TCGA files in 15 series (ID_0003 = ID_0006), abdomen, JPEG-LS, JPEG 2000, enhanced.
    assert len(study.series) == 19 and study.members == len(files)
    assert sum(len(s.slices) for s in study.series) == 15 + 20 + 1 + 1 + 2
    assert len(study.skipped) == 1  # the topogram


# --- synthetic DICOM ---------------------------------------------------------------


def test_intercept_zero_and_minus_1024_give_identical_values() -> None:
    hu = hu_image((512, 512))
    a = ingest([("a.dcm", ct((hu + 1024).astype(np.uint16), intercept="-1024"))])
    b = ingest([("b.dcm", ct(hu, intercept="0"))])
    np.testing.assert_array_equal(a.series[0].pixels[0], hu + 1024)
    np.testing.assert_array_equal(b.series[0].pixels[0], hu + 1024)


@pytest.mark.parametrize("text", [b" -1024  ", b"-1024.0 ", b"-1.024E3"])
def test_odd_intercept_text_is_tolerated(text: bytes) -> None:
    values = (hu_image((512, 512)) + 1024).astype(np.uint16)
    data = ct(values, intercept="-1024.0")
    assert data.count(b"-1024.0 ") == 1
    (series,) = ingest([("a.dcm", data.replace(b"-1024.0 ", text))]).series
    np.testing.assert_array_equal(series.pixels[0], values)


def test_slope_is_applied() -> None:
    values = (hu_image((512, 512)) + 1024).astype(np.uint16)
    (series,) = ingest([("a.dcm", ct(values, intercept="-2048", slope="2"))]).series
    np.testing.assert_array_equal(series.pixels[0], np.clip(2 * values.astype(int) - 1024, 0, None))


@pytest.mark.parametrize(("slope", "intercept"), [("1e300", "-1024"), ("0", "-1024"), ("1", "1e9")])
def test_absurd_rescale_is_a_corrupt_member(slope: str, intercept: str) -> None:
    values = np.full((512, 512), 1000, np.uint16)
    with pytest.raises(CorruptMemberError):
        ingest([("a.dcm", ct(values, intercept=intercept, slope=slope))])


def test_monochrome1_is_inverted() -> None:
    hu = hu_image()
    m2 = ct((hu + 1024).astype(np.uint16))
    m1 = ct((4095 - (hu + 1024)).astype(np.uint16), photometric="MONOCHROME1")
    pixels = [ingest([("x.dcm", data)]).series[0].pixels for data in (m2, m1)]
    np.testing.assert_array_equal(pixels[0], pixels[1])


def test_slices_are_clipped_at_zero_and_resampled() -> None:
    hu = np.full((256, 256), -3000, np.int16)
    hu[64:192, 64:192] = 40
    (series,) = ingest([("x.dcm", ct(hu, intercept="0"))]).series
    assert series.resampled_from == (256, 256) and series.pixels.shape == (1, 512, 512)
    assert any("resampled" in note for note in series.notes)
    assert series.pixels[0, 0, 0] == 0 and series.pixels[0, 256, 256] == 1064


def test_resampling_is_bilinear_with_corners_kept() -> None:
    ramp = np.tile(np.arange(0, 2560, 10, dtype=np.uint16), (256, 1))  # 0 … 2550 along x
    (series,) = ingest([("x.dcm", ct(ramp))]).series
    row = series.pixels[0, 100].astype(float)
    np.testing.assert_allclose(row, np.linspace(0, 2550, 512), atol=0.5)
    assert np.all(series.pixels[0] == series.pixels[0, :1])


def test_position_missing_falls_back_to_instance_number_then_name() -> None:
    image = np.zeros((16, 16), np.uint16)
    by_instance = ingest(
        [(f"{n}.dcm", ct(image, z=None, instance=i)) for n, i in (("a", 2), ("b", 1))]
    )
    series = by_instance.series[0]
    assert [s.source for s in series.slices] == ["b.dcm", "a.dcm"]
    assert series.order.startswith("InstanceNumber")
    by_name = ingest([(f"IM{i}.dcm", ct(image, z=None, instance=None)) for i in (10, 9)])
    assert [s.source for s in by_name.series[0].slices] == ["IM9.dcm", "IM10.dcm"]


def test_series_are_grouped_by_uid_and_numbered() -> None:
    image = np.zeros((512, 512), np.uint16)
    files = [(f"s{u}/{z}.dcm", ct(image, uid=f"1.2.{u}", z=z)) for u in (2, 1) for z in (0, 5, 10)]
    study = ingest(files)
    assert [(s.index, s.key, len(s.slices)) for s in study.series] == [
        (1, "1.2.1", 3),
        (2, "1.2.2", 3),
    ]
    assert [s.position_mm for s in study.series[0].slices] == [10, 5, 0]


def test_dicom_without_preamble_or_meta_is_read() -> None:
    hu = hu_image((32, 32))
    data = ct(hu, intercept="0")
    no_preamble = data[132:]  # meta group first, no 'DICM'
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    for payload in (no_preamble, bare.getvalue()):
        assert payload[128:132] != b"DICM"
        (series,) = ingest([("x", payload)]).series
        np.testing.assert_array_equal(series.pixels, ingest([("y", data)]).series[0].pixels)


def test_non_images_are_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    image = np.zeros((512, 512), np.uint16)
    study = ingest([
        ("readme.txt", b"hello"),
        (f"{PLANTED}.dcm", ct(image, pixels=False)),
        ("mr.dcm", ct(image, modality="MR")),
        ("__MACOSX/._x.dcm", b"junk"),
        ("scan/.DS_Store", b"junk"),
        ("scan/x.dcm", ct(image)),
    ])  # fmt: skip
    assert study.members == 6 and len(study.series) == 1
    reasons = {s.index: s.reason for s in study.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "neither DICOM nor TIFF" in reasons[1] and "without pixel data" in reasons[2]
    assert "not a CT" in reasons[3] and "hidden" in reasons[4] and "hidden" in reasons[5]
    assert PLANTED not in caplog.text and PLANTED not in str(study.skipped)


# --- TIFF --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "kwargs", "reason"),
    [
        (np.zeros((512, 512), np.float32), {}, "float TIFF has lost the raw stored values"),
        (np.zeros((512, 512, 3), np.uint8), {"photometric": "rgb"}, "RGB"),
        (np.zeros((512, 512, 3), np.uint16), {"photometric": "rgb"}, "RGB"),
        (np.zeros((512, 512), np.uint8), {}, "8-bit TIFF"),
    ],
)
def test_tiffs_that_cannot_hold_raw_ct_are_rejected(
    values: np.ndarray, kwargs: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(UnsupportedImageError, match=reason) as info:
        ingest([(f"{PLANTED}.tif", tiff(values, **kwargs))])
    assert info.value.status == 415
    assert_no_leak(info.value)


def test_tiff_pages_and_signed_values() -> None:
    pages = np.stack([np.full((512, 512), v, np.int16) for v in (-5, 7, 3000)])
    (series,) = ingest([("stack/one.tif", tiff(pages, photometric="minisblack"))]).series
    assert [s.frame for s in series.slices] == [0, 1, 2]
    assert series.pixels[:, 0, 0].tolist() == [0, 7, 3000]


def test_bigtiff_is_read() -> None:
    image = np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 70_000
    (series,) = ingest([("big.tif", tiff(image, bigtiff=True))]).series
    np.testing.assert_array_equal(series.pixels[0], np.minimum(image, 65535))


def test_tiff_folders_are_series() -> None:
    image = np.ones((512, 512), np.uint16)
    study = ingest([(f"{d}/IM{i}.tif", tiff(image)) for d in ("SR_3", "SR_2") for i in (1, 2)])
    assert [(s.key, len(s.slices)) for s in study.series] == [("SR_2", 2), ("SR_3", 2)]


# --- errors and limits -------------------------------------------------------------


def test_not_a_zip() -> None:
    for data in (b"", b"not a zip at all", ct(np.zeros((4, 4), np.uint16))):
        with pytest.raises(NotAZipError):
            ingest_zip(data, SETTINGS)


def test_empty_zip_and_file_object() -> None:
    with pytest.raises(NoImageError, match="no usable CT slice among 0"):
        ingest_zip(zip_files([]), SETTINGS)
    study = ingest_zip(
        io.BytesIO(zip_files([("x.dcm", ct(np.zeros((512, 512), np.uint16)))])), SETTINGS
    )
    assert len(study.series) == 1


def test_only_skipped_members_summarise_the_reasons(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(NoImageError) as info:
        ingest([(f"{PLANTED}.txt", b"x"), ("b.txt", b"y"), ("c/.DS_Store", b"z")])
    assert "2 × neither DICOM nor TIFF" in info.value.detail
    assert "1 × hidden or operating-system file" in info.value.detail
    assert_no_leak(info.value)


def test_8_bit_dicom_and_unsupported_syntax_are_415() -> None:
    with pytest.raises(UnsupportedImageError, match="8-bit"):
        ingest([("x.dcm", ct(np.zeros((16, 16), np.uint8), bits=8))])
    data = ct(np.zeros((16, 16), np.uint16))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2") as info:
        ingest([("x.dcm", buf.getvalue())])
    assert info.value.status == 415


def test_corrupt_pixels_are_skipped() -> None:
    good = ct(np.zeros((512, 512), np.uint16), z=0)
    truncated = ct(np.zeros((512, 512), np.uint16), z=5)[:-1000]
    study = ingest([("a.dcm", good), ("b.dcm", truncated)])
    assert len(study.series[0].slices) == 1 and study.skipped[0].index == 2
    with pytest.raises(CorruptMemberError):
        ingest([("b.dcm", truncated)])


def test_mixed_sizes_in_a_series(caplog: pytest.LogCaptureFixture) -> None:
    files = [(f"{PLANTED}/a.dcm", ct(np.zeros((512, 512), np.uint16), z=0)),
             (f"{PLANTED}/b.dcm", ct(np.zeros((256, 256), np.uint16), z=5))]  # fmt: skip
    with pytest.raises(MixedSliceSizesError, match="512×512") as info:
        ingest(files)
    assert_no_leak(info.value)


def test_too_many_members_and_slices() -> None:
    files = [(f"{i}.dcm", ct(np.zeros((8, 8), np.uint16), z=i)) for i in range(4)]
    with pytest.raises(TooManyMembersError):
        ingest(files, max_members=3)
    with pytest.raises(TooManySlicesError):
        ingest(files, max_slices_per_series=3)
    with pytest.raises(TooManySlicesError):
        ingest(files, max_slices_total=3)


def zeros_zip(size: int) -> bytes:
    """A deflated member of `size` zero bytes, written without holding it in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("bomb.dcm", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return buf.getvalue()


def test_zip_bomb_is_refused_before_expanding() -> None:
    bomb = zeros_zip(200 << 20)
    assert len(bomb) < 1 << 20
    start = time.perf_counter()
    with pytest.raises(ZipBombError, match="fold"):
        ingest_zip(bomb, SETTINGS)
    with pytest.raises(ZipBombError, match="declares"):
        ingest_zip(bomb, SETTINGS.model_copy(update={"max_uncompressed_bytes": 100 << 20}))
    assert time.perf_counter() - start < 1


def test_lying_sizes_cannot_expand() -> None:
    """A header that understates the size: the read stops at the declared size."""
    bomb = bytearray(zeros_zip(50 << 20))
    local, central = bomb.find(b"PK\x03\x04"), bomb.find(b"PK\x01\x02")
    struct.pack_into("<I", bomb, local + 22, 1000)  # uncompressed size, local header
    struct.pack_into("<I", bomb, central + 24, 1000)  # and central directory
    start = time.perf_counter()
    with pytest.raises(CorruptMemberError):
        ingest_zip(bytes(bomb), SETTINGS)
    assert time.perf_counter() - start < 1


def test_encrypted_members() -> None:
    data = bytearray(zip_files([("x.dcm", ct(np.zeros((8, 8), np.uint16)))]))
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 6] |= 1  # general purpose flag: encrypted
    data[central + 8] |= 1
    with pytest.raises(EncryptedMemberError):
        ingest_zip(bytes(data), SETTINGS)
