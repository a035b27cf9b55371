"""Hostile and broken uploads through the real app: each failure kind gets its status and
stable problem type, with the request id and without member names; limits hold while the
upload streams; a 1 GiB zip bomb is refused without being inflated, within 100 MB; and the
service keeps answering afterwards."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
from fastapi.testclient import TestClient

from app.errors import PROBLEM_BASE
from dicom_factory import PHI_STRINGS, dicom_bytes, synthetic_ct, tiff_bytes
from hostile import (
    DIAGNOSE,
    asgi_post,
    corrupt_deflate,
    diagnose_scope,
    encrypted,
    nested_zip,
    overlapping_bomb,
    p002_slice,
    p002_tiff,
    post,
    zip_bomb,
    zip_by_hand,
)
from hostile import assert_problem as problem
from shared_data import VARIANTS, needs_data, zip_files
from support import sharing_app, started

pytestmark = [needs_data, pytest.mark.usefixtures("production_warning_filters")]


PHI_DIR = "DOE_JOHN_1970"  # every member of the broken uploads sits in a folder named so
LIMITS = {
    "max_upload_bytes": 2 << 20,
    "max_members": 5,
    "max_uncompressed_bytes": 16 << 20,
    "max_slices_per_series": 3,
    "max_slices_total": 5,
}


@pytest.fixture(scope="module")
def predictor(client: TestClient) -> Any:
    return client.app.state.runtime.engine.predictor  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def limited(predictor: Any, test_model_dir: Path) -> Iterator[TestClient]:
    """The real app with small limits, sharing the session's loaded model."""
    with started(sharing_app(predictor, test_model_dir, **LIMITS)) as client:
        yield client


@pytest.fixture(scope="module")
def valid_zip() -> bytes:
    return zip_files([("P002/IM0060.dcm", p002_slice(60))])


def refused(client: TestClient, archive: bytes, status: int, type_: str) -> dict[str, Any]:
    """Post with a known request id; the answer is the problem, and names nothing."""
    response = post(client, archive, headers={"X-Request-ID": f"hostile-{type_}"})
    body = problem(response, status, type_)
    assert body["request_id"] == f"hostile-{type_}"
    for planted in (PHI_DIR, *PHI_STRINGS):
        assert planted not in response.text
    return body


def in_phi_dir(*members: tuple[str, bytes]) -> bytes:
    return zip_files([(f"{PHI_DIR}/{name}", data) for name, data in members])


def assert_still_serving(client: TestClient, valid_zip: bytes) -> None:
    assert client.get("/health").status_code == 200
    r = post(client, valid_zip, patient_id="AFTER")
    assert r.status_code == 200, r.text
    assert r.json()["patient_id"] == "AFTER" and r.json()["n"] == 1


def image(shape: tuple[int, ...] = (512, 512), value: int = 1000) -> np.ndarray:
    return np.full(shape, value, np.uint16)


# --- the archive ----------------------------------------------------------------------------

ARCHIVES = {
    "random bytes": (b"\x00\x01garbage" * 100, 400, "not-a-zip"),
    "empty upload": (b"", 400, "not-a-zip"),
    "a DICOM file, not zipped": (synthetic_ct(image((8, 8))), 400, "not-a-zip"),
    "truncated archive": (None, 400, "not-a-zip"),
    "empty zip": (zip_files([]), 422, "no-image"),
    "only non-images": (None, 422, "no-image"),
    "nested zip only": (None, 422, "no-image"),
    "encrypted member": (None, 400, "encrypted-member"),
    "corrupt deflate stream": (None, 400, "corrupt-member"),
    "bzip2 member": (None, 400, "corrupt-member"),
}


def build_archive(case: str) -> bytes:
    given = ARCHIVES[case][0]
    if given is not None:
        return given
    slice_ = p002_slice(60).read_bytes()
    if case == "truncated archive":
        return in_phi_dir(("IM0060.dcm", slice_))[:-100]
    if case == "only non-images":
        return in_phi_dir(("notes.txt", b"DOE^JOHN 1970"), ("report.pdf", b"%PDF-1.4"))
    if case == "nested zip only":
        return in_phi_dir(("inner.zip", zip_files([("IM0060.dcm", slice_)])))
    if case == "encrypted member":
        return encrypted(in_phi_dir(("IM0060.dcm", slice_)))
    if case == "corrupt deflate stream":
        return corrupt_deflate(slice_)
    assert case == "bzip2 member"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr(f"{PHI_DIR}/IM0060.dcm", slice_)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_broken_archives(client: TestClient, valid_zip: bytes, case: str) -> None:
    _, status, type_ = ARCHIVES[case]
    refused(client, build_archive(case), status, type_)
    assert_still_serving(client, valid_zip)


def test_nested_zip_is_skipped_with_a_reason_not_opened(client: TestClient) -> None:
    inner = zip_files([("IM0061.dcm", p002_slice(61))])
    archive = zip_files(
        [("P002/IM0060.dcm", p002_slice(60)), ("P002/inner.zip", nested_zip(inner))]
    )
    r = post(client, archive)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sum(s["slices_total"] for s in body["series"]) == 1  # the inner slice not read
    (skipped,) = body["skipped"]
    assert skipped["member_index"] == 2 and "nested archive" in skipped["reason"]


def test_non_images_are_counted_and_ignored(client: TestClient) -> None:
    archive = zip_files(
        [("P002/IM0060.dcm", p002_slice(60)), ("P002/readme.txt", b"x"), (".DS_Store", b"x")]
    )
    body = post(client, archive).json()
    assert [s["member_index"] for s in body["skipped"]] == [2, 3]
    assert body["n"] == 1


# --- the images -------------------------------------------------------------------------------


def unsupported_syntax() -> bytes:
    ds = pydicom.dcmread(p002_slice(60))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    return dicom_bytes(ds)


def float_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(image((16, 16)))), force=True)
    del ds.PixelData
    ds.FloatPixelData = np.zeros((16, 16), np.float32).tobytes()
    return dicom_bytes(ds)


IMAGES = {
    "unsupported transfer syntax": (
        unsupported_syntax, 415, "unsupported-transfer-syntax", "MPEG2"
    ),
    "float TIFF": (
        lambda: tiff_bytes(np.zeros((64, 64), np.float32)), 415, "unsupported-image", "float TIFF"
    ),
    "RGB TIFF": (
        lambda: tiff_bytes(np.zeros((64, 64, 3), np.uint8), photometric="rgb"),
        415, "unsupported-image", "RGB",
    ),
    "8-bit TIFF": (
        lambda: tiff_bytes(np.zeros((64, 64), np.uint8)), 415, "unsupported-image", "8-bit TIFF"
    ),
    "8-bit DICOM": (
        lambda: synthetic_ct(image((64, 64)).astype(np.uint8), bits=8),
        415, "unsupported-image", "8-bit DICOM",
    ),
    "RGB DICOM": (
        lambda: synthetic_ct(image((16, 16, 3)), samples=3, photometric="RGB"),
        415, "unsupported-image", "colour DICOM",
    ),
    "float DICOM": (float_dicom, 415, "unsupported-image", "float DICOM"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(IMAGES))
def test_images_that_cannot_be_raw_ct(client: TestClient, valid_zip: bytes, case: str) -> None:
    make, status, type_, reason = IMAGES[case]
    body = refused(client, in_phi_dir(("IM0001.x", make())), status, type_)
    assert reason in body["detail"]
    assert_still_serving(client, valid_zip)


def test_mixed_slice_sizes_in_a_series(client: TestClient) -> None:
    archive = in_phi_dir(
        ("a.dcm", synthetic_ct(image((512, 512)), z=0)),
        ("b.dcm", synthetic_ct(image((256, 256)), z=5)),
    )
    body = refused(client, archive, 422, "mixed-slice-sizes")
    assert "512×512" in body["detail"] and "256×256" in body["detail"]


def test_truncated_pixel_data_is_corrupt(client: TestClient) -> None:
    truncated = p002_slice(60).read_bytes()[:-20_000]
    refused(client, in_phi_dir(("IM0060.dcm", truncated)), 400, "corrupt-member")


def test_float_and_good_slice_together_keep_the_good_one(client: TestClient) -> None:
    float_tiff = tiff_bytes(np.zeros((64, 64), np.float32))
    archive = zip_files([("a/IM0060.dcm", p002_slice(60)), ("b/x.tif", float_tiff)])
    r = post(client, archive)
    assert r.status_code == 200, r.text
    body = r.json()
    (series,) = body["series"]
    assert (series["kind"], series["slices_total"], body["n"]) == ("dicom", 1, 1)
    (skipped,) = body["skipped"]
    assert skipped["member_index"] == 2 and "float TIFF" in skipped["reason"]


def test_a_good_tiff_beside_a_dicom_slice_is_a_second_series(client: TestClient) -> None:
    archive = zip_files([("a/IM0060.dcm", p002_slice(60)), ("b/x.tif", p002_tiff(60))])
    body = post(client, archive).json()
    assert sorted(s["kind"] for s in body["series"]) == ["dicom", "tiff"]
    assert body["skipped"] == []


# --- limits -----------------------------------------------------------------------------------


def test_too_many_members(limited: TestClient) -> None:
    archive = in_phi_dir(*[(f"{i}.txt", b"x") for i in range(6)])
    body = refused(limited, archive, 413, "too-many-members")
    assert "6 files" in body["detail"] and "5" in body["detail"]


def pages(n: int) -> bytes:
    return tiff_bytes(np.zeros((n, 8, 8), np.uint16), photometric="minisblack")


def test_too_many_slices_per_series_and_in_total(limited: TestClient) -> None:
    per_series = in_phi_dir(*[(f"{i}.dcm", synthetic_ct(image((8, 8)), z=i)) for i in range(4)])
    refused(limited, per_series, 413, "too-many-slices")
    three_pages = pages(3)
    two_series = in_phi_dir(("a/stack.tif", three_pages), ("b/stack.tif", three_pages))
    assert "more than 5 slices" in refused(limited, two_series, 413, "too-many-slices")["detail"]
    refused(limited, in_phi_dir(("stack.tif", pages(4))), 413, "too-many-slices")


def test_declared_uncompressed_size_over_the_limit(limited: TestClient) -> None:
    # 17 MiB declared against a 16 MiB limit: refused before anything is inflated.
    archive = zip_by_hand([("IM0001.dcm", b"\x03\x00", zipfile.ZIP_DEFLATED, 0, 17 << 20, 0)])
    body = refused(limited, archive, 413, "zip-bomb")
    assert "declares" in body["detail"]


def test_upload_over_the_byte_limit_is_refused_up_front(limited: TestClient) -> None:
    big = np.random.default_rng(0).bytes(3 << 20)
    body = refused(limited, zip_files([("x.dcm", big)]), 413, "too-large")
    assert "Content-Length" in body["detail"]


def test_upload_over_the_byte_limit_is_refused_while_streaming(limited: TestClient) -> None:
    def chunked() -> Iterator[bytes]:  # no Content-Length: the guard counts the bytes
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
        for _ in range(48):
            yield bytes(64 << 10)
        yield b'\r\n--b\r\nContent-Disposition: form-data; name="patient_id"\r\n\r\nP\r\n--b--\r\n'

    r = limited.post(
        DIAGNOSE, content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    body = problem(r, 413, "too-large")
    assert "request body exceeds" in body["detail"]


def test_the_guard_stops_reading_at_the_limit(predictor: Any, test_model_dir: Path) -> None:
    app = sharing_app(predictor, test_model_dir, max_upload_bytes=1 << 20)
    form = {"content-type": "multipart/form-data; boundary=b"}
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
    chunks = [head] + [bytes(256 << 10)] * 40  # 10 MiB offered
    status, read = asgi_post(app, form, chunks)
    assert (status, read) == (413, 5)  # refused within the chunk that crossed 1 MiB
    # A declared Content-Length over the limit: refused before a single body byte is read.
    status, read = asgi_post(app, {**form, "content-length": str(10 << 20)}, chunks)
    assert (status, read) == (413, 0)


def test_too_many_uploads_at_once_get_503_before_their_body_is_read(
    predictor: Any, test_model_dir: Path
) -> None:
    app = sharing_app(predictor, test_model_dir, max_concurrent_uploads=1, retry_after_s=7)
    headers = {"content-type": "multipart/form-data; boundary=b"}

    async def scenario() -> list[tuple[int, dict[bytes, bytes], str]]:
        gate, reading, answers = asyncio.Event(), asyncio.Event(), []

        async def call(receive: Any) -> None:
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(diagnose_scope(headers), receive, send)  # type: ignore[arg-type]
            body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
            answers.append((sent[0]["status"], dict(sent[0]["headers"]), body["type"]))

        reads = 0

        async def slow() -> dict[str, Any]:  # the first upload is still arriving
            reading.set()
            await gate.wait()
            return {"type": "http.request", "body": b"--b--\r\n", "more_body": False}

        async def counted() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"--b--\r\n", "more_body": False}

        first = asyncio.create_task(call(slow))
        await reading.wait()  # the first is past the door, reading its body
        await call(counted)  # while the first is in progress
        assert reads == 0
        gate.set()
        await first
        await call(counted)  # after it: through the door again
        return answers

    # (The app's lifespan is not run here: past the door, the route says "not ready".)
    (busy, headers_, busy_type), (_, _, first), (_, _, later) = asyncio.run(scenario())
    assert (busy, busy_type) == (503, f"{PROBLEM_BASE}queue-full")
    assert headers_[b"retry-after"] == b"7"
    assert first == later == f"{PROBLEM_BASE}not-ready"


# --- zip bombs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = zip_bomb(1 << 30)
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    assert info.file_size == 1 << 30 and len(data) < 2 << 20
    with zipfile.ZipFile(io.BytesIO(data)).open(info) as member:  # a genuine deflate stream
        assert member.read(8 << 20) == bytes(8 << 20)
    return data


class CountingInflater:
    """A zlib decompressor that records how many bytes it put out."""

    def __init__(self, inner: Any, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out: bytes = self.inner.decompress(data, max_length)
        self.sizes.append(len(out))
        return out

    def flush(self, *args: int) -> bytes:
        out: bytes = self.inner.flush(*args)
        self.sizes.append(len(out))
        return out

    def __getattr__(self, name: str) -> Any:  # eof, unconsumed_tail, unused_data
        return getattr(self.inner, name)


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes put out by every deflate decompressor while the test runs: what was inflated.
    (A bound on work done, unlike a time limit, holds on a loaded machine.)"""
    sizes: list[int] = []
    make = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: CountingInflater(make(*a), sizes))
    return sizes


class RssPeak:
    """Highest resident set size of this process while the block runs, sampled every 2 ms."""

    def __enter__(self) -> RssPeak:
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def test_1_gib_zip_bomb_is_refused_uninflated_within_100_mb(
    client: TestClient, bomb: bytes, valid_zip: bytes, inflated: list[int]
) -> None:
    post(client, b"warm the route up")
    with RssPeak() as rss:
        t0 = time.perf_counter()
        r = post(client, bomb)
        elapsed = time.perf_counter() - t0
    body = problem(r, 413, "zip-bomb")
    assert "expands" in body["detail"]
    tracemalloc.start()
    try:
        problem(post(client, bomb), 413, "zip-bomb")
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"1 GiB zip bomb ({len(bomb)} bytes): refused in {elapsed * 1000:.0f} ms, RSS +"
        f"{(rss.peak - rss.start) / 2**20:.1f} MiB, traced peak {traced_peak / 2**20:.1f} MiB, "
        f"{sum(inflated)} bytes inflated"
    )
    assert sum(inflated) == 0  # refused on what the archive declares
    assert rss.peak - rss.start < 100 << 20
    assert traced_peak < 100 << 20
    assert_still_serving(client, valid_zip)


def test_bomb_that_understates_its_size_stops_at_the_declared_size(
    client: TestClient, bomb: bytes, inflated: list[int]
) -> None:
    lying = bytearray(bomb)
    for at, offset in ((lying.find(b"PK\x03\x04"), 22), (lying.find(b"PK\x01\x02"), 24)):
        struct.pack_into("<I", lying, at + offset, 1000)  # uncompressed size: 1000 bytes
    refused(client, bytes(lying), 400, "corrupt-member")
    # zipfile's read buffers past the declared 1000 bytes; nothing near the 1 GiB.
    assert 1000 <= sum(inflated) <= 64 << 10


def test_bomb_that_overstates_its_compressed_size_is_refused(
    client: TestClient, bomb: bytes
) -> None:
    # A compressed size of 100 MB makes the ratio look harmless (about 10); the archive
    # is only 1 MB, so the member cannot hold what it claims.
    lying = bytearray(bomb)
    for at, offset in ((lying.find(b"PK\x03\x04"), 18), (lying.find(b"PK\x01\x02"), 20)):
        struct.pack_into("<I", lying, at + offset, 100_000_000)
    body = refused(client, bytes(lying), 413, "zip-bomb")
    assert "overlap" in body["detail"]


def test_overlapping_members_bomb_is_refused(client: TestClient, inflated: list[int]) -> None:
    refused(client, overlapping_bomb(members=200, size=16 << 20), 413, "zip-bomb")
    assert sum(inflated) == 0  # refused on the archive's layout


def test_many_small_members_that_expand_together(client: TestClient) -> None:
    # 64 members of 1 MiB of zeros each: each under the per-member ratio check, the
    # archive as a whole expands about 1000-fold.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(64):
            zf.writestr(f"{PHI_DIR}/{i}.dcm", bytes(1 << 20))
    body = refused(client, buf.getvalue(), 413, "zip-bomb")
    assert "archive expands" in body["detail"]


# --- the form -----------------------------------------------------------------------------------


def test_form_errors_are_problems(client: TestClient, valid_zip: bytes) -> None:
    files = {"file": ("a.zip", valid_zip, "application/zip")}
    problem(client.post(DIAGNOSE, files=files), 422, "invalid-request")  # no patient_id
    problem(client.post(DIAGNOSE, data={"patient_id": "p"}), 422, "invalid-request")  # no file
    long_id = client.post(DIAGNOSE, files=files, data={"patient_id": "DOE^JOHN" * 40})
    assert "DOE^JOHN" not in problem(long_id, 422, "invalid-request")["detail"]
    as_text = client.post(DIAGNOSE, data={"patient_id": "p", "file": "not a file"})
    problem(as_text, 422, "invalid-request")
    bad_boundary = client.post(
        DIAGNOSE,
        content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    # An unterminated part still parses: a text field "file", no patient_id.
    problem(bad_boundary, 422, "invalid-request")
    problem(client.get(DIAGNOSE), 405, "method-not-allowed")
    problem(client.get("/nowhere"), 404, "not-found")


def test_the_service_is_healthy_after_all_of_it(client: TestClient, valid_zip: bytes) -> None:
    assert_still_serving(client, valid_zip)
    assert client.get("/health/live").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_variants_still_work(client: TestClient) -> None:
    archive = zip_files([("v/jls.dcm", VARIANTS / "chest-jpeg-ls-near-lossless.dcm")])
    assert post(client, archive).status_code == 200
