"""DICOM members (app/ingest/dicom.py): the stored-value domain (HU + 1024 from each
slice's own Modality LUT, whatever the photometric interpretation), compressed syntaxes,
what is skipped and why, and the library set-up (app/ingest/libraries.py)."""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGLosslessSV1

from app.errors import (
    CorruptMemberError,
    NoImageError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from app.ingest import IngestLimits, configure_libraries
from app.ingest.dicom import decode_frame, one_frame, read_dicom
from app.ingest.frames import Frame
from dicom_factory import PHI_STRINGS, dicom_bytes, file_bytes, multi_frame_ct, synthetic_ct
from ingest_support import hu_image, ingest, stored
from shared_data import P002, ROOT, VARIANTS, needs_data

TCGA = VARIANTS / "tcga-luad-single-slices"


# --- the stored-value domain -----------------------------------------------------------


@needs_data
@pytest.mark.parametrize("i", [0, 66, 132])
def test_p002_pixels_are_the_stored_values(i: int) -> None:
    # RescaleIntercept −1024, slope 1: the stored values already are HU + 1024.
    path = P002 / f"IM{i + 1:04d}.dcm"
    (series,) = ingest([(path.name, path)]).series
    np.testing.assert_array_equal(series.pixels[0], stored(path))


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


def test_intercept_zero_and_minus_1024_give_identical_values() -> None:
    hu = hu_image((512, 512))
    a = ingest([("a.dcm", synthetic_ct((hu + 1024).astype(np.uint16), intercept="-1024"))])
    b = ingest([("b.dcm", synthetic_ct(hu, intercept="0"))])
    np.testing.assert_array_equal(a.series[0].pixels[0], hu + 1024)
    np.testing.assert_array_equal(b.series[0].pixels[0], hu + 1024)


@pytest.mark.parametrize("text", [b" -1024  ", b"-1024.0 ", b"-1.024E3"])
def test_odd_intercept_text_is_tolerated(text: bytes) -> None:
    values = (hu_image((512, 512)) + 1024).astype(np.uint16)
    data = synthetic_ct(values, intercept="-1024.0")
    assert data.count(b"-1024.0 ") == 1
    (series,) = ingest([("a.dcm", data.replace(b"-1024.0 ", text))]).series
    np.testing.assert_array_equal(series.pixels[0], values)


def test_slope_is_applied() -> None:
    values = (hu_image((512, 512)) + 1024).astype(np.uint16)
    (series,) = ingest([("a.dcm", synthetic_ct(values, intercept="-2048", slope="2"))]).series
    np.testing.assert_array_equal(series.pixels[0], np.clip(2 * values.astype(int) - 1024, 0, None))


@pytest.mark.parametrize(("slope", "intercept"), [("1e300", "-1024"), ("0", "-1024"), ("1", "1e9")])
def test_absurd_rescale_is_a_corrupt_member(slope: str, intercept: str) -> None:
    values = np.full((512, 512), 1000, np.uint16)
    with pytest.raises(CorruptMemberError):
        ingest([("a.dcm", synthetic_ct(values, intercept=intercept, slope=slope))])


def test_monochrome1_gives_the_same_values_as_monochrome2() -> None:
    """The Modality LUT gives HU whatever the photometric interpretation: MONOCHROME1 only
    tells a viewer to show low values bright (the code once inverted it: DESIGN.md was wrong)."""
    values = (hu_image((512, 512)) + 1024).astype(np.uint16)
    m1, m2 = (
        ingest([("x.dcm", synthetic_ct(values, photometric=p))]).series[0].pixels[0]
        for p in ("MONOCHROME1", "MONOCHROME2")
    )
    np.testing.assert_array_equal(m1, values)
    np.testing.assert_array_equal(m2, values)


@needs_data
def test_a_real_slice_relabelled_monochrome1_keeps_its_values() -> None:
    ds = pydicom.dcmread(P002 / "IM0060.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    (series,) = ingest([("m1.dcm", dicom_bytes(ds))]).series
    np.testing.assert_array_equal(series.pixels[0], stored(P002 / "IM0060.dcm"))


# --- files and syntaxes -------------------------------------------------------------------


def test_dicom_without_preamble_or_meta_is_read() -> None:
    hu = hu_image((32, 32))
    data = synthetic_ct(hu, intercept="0")
    no_preamble = data[132:]  # meta group first, no 'DICM'
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    expected = ingest([("y", data)]).series[0].pixels
    for payload in (no_preamble, bare.getvalue()):
        assert payload[128:132] != b"DICM"
        (series,) = ingest([("x", payload)]).series
        np.testing.assert_array_equal(series.pixels, expected)


def test_8_bit_dicom_and_unsupported_syntax_are_415() -> None:
    with pytest.raises(UnsupportedImageError, match="8-bit"):
        ingest([("x.dcm", synthetic_ct(np.zeros((16, 16), np.uint8), bits=8))])
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((16, 16), np.uint16))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2") as info:
        ingest([("x.dcm", file_bytes(ds))])
    assert info.value.status == 415


def test_deflated_dicom_is_refused_before_it_is_inflated() -> None:
    """pydicom inflates a deflated data set whole, with no bound: 64 MiB of zeros deflate
    to ~64 KiB. Refused from the file meta alone (415), and skipped beside a good slice."""
    import tracemalloc

    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((16, 16), np.uint16))))
    ds.PixelData = bytes(16 * 16 * 2)
    ds.add_new(0x00091010, "OB", bytes(64 << 20))  # a private element that inflates
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    plain = buf.getvalue()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated = file_bytes(ds)
    assert len(deflated) < len(plain) // 100
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedTransferSyntaxError, match="deflated") as info:
            ingest([("x.dcm", deflated)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 415
    assert peak < 16 << 20  # never inflated (64 MiB)
    good = synthetic_ct(np.zeros((512, 512), np.uint16), z=0)
    study = ingest([("a.dcm", good), ("b.dcm", deflated)])
    assert len(study.series[0].slices) == 1 and study.skipped[0].index == 2


def test_corrupt_pixels_are_skipped() -> None:
    good = synthetic_ct(np.zeros((512, 512), np.uint16), z=0)
    truncated = synthetic_ct(np.zeros((512, 512), np.uint16), z=5)[:-1000]
    study = ingest([("a.dcm", good), ("b.dcm", truncated)])
    assert len(study.series[0].slices) == 1 and study.skipped[0].index == 2
    with pytest.raises(CorruptMemberError):
        ingest([("b.dcm", truncated)])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pixels": False}, "without pixel data"),
        ({"modality": "MR"}, "not a CT image"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
    ],
)
def test_what_is_not_an_axial_ct_image_is_skipped(kwargs: dict[str, object], reason: str) -> None:
    image = np.zeros((16, 16), np.uint16)
    with pytest.raises(NoImageError, match=reason):
        ingest([("x.dcm", synthetic_ct(image, **kwargs))])  # type: ignore[arg-type]


@needs_data
def test_localizer_is_skipped_with_a_reason() -> None:
    topogram = VARIANTS / "chest-topogram-400x512.dcm"
    study = ingest([("t.dcm", topogram), ("a.dcm", TCGA / "ID_0000.dcm")])
    assert len(study.series) == 1
    assert [(s.index, "localizer" in s.reason) for s in study.skipped] == [(1, True)]
    with pytest.raises(NoImageError, match="localizer"):
        ingest([("t.dcm", topogram)])


# --- what a decode worker gets -------------------------------------------------------------

FRAMES = np.random.default_rng(1).integers(0, 3000, (3, 64, 64)).astype(np.uint16)  # HU + 1024


def read(data: bytes) -> list[Frame]:
    return read_dicom(1, "x.dcm", data, IngestLimits())


def test_a_task_is_the_pixel_data_without_the_header() -> None:
    (frame,) = read(synthetic_ct(FRAMES[0]))
    task = frame.task
    assert task is not None and one_frame(task) is task  # one frame: nothing to cut
    assert task.pixels == FRAMES[0].tobytes()
    sent = pickle.dumps(task)  # what a worker process gets
    assert not any(planted.encode() in sent for planted in PHI_STRINGS)
    np.testing.assert_array_equal(decode_frame(*task), FRAMES[0])


MULTI_FRAME: dict[str, dict[str, bool | int]] = {
    "uncompressed": {},
    "rle": {"rle": True},
    "rle-no-offset-table": {"rle": True, "offset_table": False},
    "rle-2-fragments-a-frame": {"rle": True, "fragments": 2},
}


@pytest.mark.parametrize("kind", list(MULTI_FRAME))
def test_a_multi_frame_task_leaves_with_its_own_frame_only(kind: str) -> None:
    frames = read(multi_frame_ct(FRAMES, **MULTI_FRAME[kind]))  # type: ignore[arg-type]
    assert [f.frame for f in frames] == [0, 1, 2]
    for f in frames:
        assert f.task is not None
        sent = one_frame(f.task)
        assert (sent.frame, sent.options["number_of_frames"]) == (0, 1)
        assert len(pickle.dumps(sent)) < len(f.task.pixels) / 2  # one frame of three
        np.testing.assert_array_equal(decode_frame(*sent), FRAMES[f.task.frame])
        np.testing.assert_array_equal(f.load(), FRAMES[f.task.frame])  # from the dataset


def outcome(decode: Callable[[], np.ndarray]) -> np.ndarray | None:
    """The decoded pixels, or None when decoding raised."""
    try:
        return decode()
    except Exception:
        return None


def test_what_cannot_be_cut_to_one_frame_fails_as_it_does_in_thread() -> None:
    short = pydicom.dcmread(io.BytesIO(multi_frame_ct(FRAMES)))
    short.PixelData = short.PixelData[: 2 * FRAMES[0].nbytes + 100]  # 2 frames and a bit
    missing = pydicom.dcmread(io.BytesIO(multi_frame_ct(FRAMES, rle=True, offset_table=False)))
    encoded = list(generate_frames(missing.PixelData, number_of_frames=3))
    missing.PixelData = encapsulate([encoded[0], encoded[2]], has_bot=False)  # one gone
    # Cut: the frames pydicom finds (the first: both fragments, the JPEG-less way); sent
    # whole: those it cannot find, and every frame of a buffer too short for all of them.
    for ds, cut in ((short, [False] * 3), (missing, [True, False, False])):
        for f in read(file_bytes(ds)):
            assert f.task is not None
            sent = one_frame(f.task)
            assert (sent is not f.task) == cut[f.task.frame]
            here, there = outcome(f.load), outcome(partial(decode_frame, *sent))
            assert (here is None) == (there is None) == (f.task.frame > 0 or ds is short)
            if here is not None:
                np.testing.assert_array_equal(there, here)


def test_two_pixel_data_elements_are_a_corrupt_member() -> None:
    """pydicom decodes no dataset holding more than one: refused from the header, for a
    worker never sees the dataset."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(FRAMES[0])))
    ds.FloatPixelData = FRAMES[0].astype(np.float32).tobytes()
    with pytest.raises(CorruptMemberError, match="more than one pixel data element"):
        ingest([("x.dcm", file_bytes(ds))])


def test_a_decode_error_names_only_its_type() -> None:
    ds = pydicom.dcmread(io.BytesIO(multi_frame_ct(FRAMES, rle=True)))
    encoded = list(generate_frames(ds.PixelData, number_of_frames=3))
    ds.PixelData = encapsulate([encoded[0], bytes(64), encoded[2]])  # an RLE frame of nothing
    frames = read(file_bytes(ds))
    assert frames[1].task is not None
    with pytest.raises(RuntimeError) as info:
        decode_frame(*one_frame(frames[1].task))
    assert re.fullmatch(r"[A-Za-z]+", str(info.value))  # pickled back: no text from the data


# --- the libraries ---------------------------------------------------------------------------

_SIDE_EFFECTS = """
import json
from pydicom import config
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLosslessSV1
def state():
    validation_off = config.settings.reading_validation_mode == config.IGNORE
    return [validation_off, "gdcm" in get_decoder(JPEGLosslessSV1).available_plugins]
before = state()
import app.ingest
after_import = state()
app.ingest.configure_libraries()
app.ingest.configure_libraries()  # idempotent
print(json.dumps([before, after_import, state()]))
"""


def test_importing_ingest_changes_nothing_until_configure_libraries() -> None:
    run = subprocess.run([sys.executable, "-c", _SIDE_EFFECTS], cwd=ROOT, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    before, after_import, configured = json.loads(run.stdout)
    defaults = [False, _gdcm_installed()]  # pydicom's: validation on, GDCM when installed
    assert before == after_import == defaults
    assert configured == [True, False]  # validation off, GDCM out


def test_only_pylibjpeg_decodes_jpeg_ls() -> None:
    """pyjpegls (installed with highdicom) would give every JPEG-LS stream pylibjpeg
    refuses a second, never-fuzzed decoder: configure_libraries takes it out."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless

    for uid in (JPEGLSLossless, JPEGLSNearLossless):
        assert get_decoder(uid).available_plugins == ("pylibjpeg",)


def _gdcm_installed() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def test_gdcm_is_never_chosen_even_when_installed() -> None:
    """GDCM aborts the process on some crafted JPEG streams: configure_libraries takes it
    out of pydicom."""
    pytest.importorskip("gdcm", reason="python-gdcm not installed (then nothing to take out)")
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    configure_libraries()
    for uid in AllTransferSyntaxes:
        try:
            plugins = list(get_decoder(uid).available_plugins)
        except NotImplementedError:
            continue
        assert "gdcm" not in plugins, uid.name
    assert list(get_decoder(JPEGLosslessSV1).available_plugins) == ["pylibjpeg"]
