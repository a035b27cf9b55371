"""Hostile and broken uploads: crafted archives, seeded mutations of the real fixtures,
and apps that share one loaded model (files with patient data planted: dicom_factory.py).

Used by tests/test_hostile_input.py, test_fuzz.py, test_phi.py, test_access.py,
test_openapi_schemathesis.py and by tests/tools/fuzz.py and tests/tools/load_test.py.
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dicom_factory import dicom_bytes, tiff_bytes
from shared_data import P002, VARIANTS, zip_files

PROBLEM_JSON = "application/problem+json"
DIAGNOSE = "/patients/diagnose"

# --- requests and answers ---------------------------------------------------------------


def post(
    client: TestClient,
    archive: bytes,
    patient_id: str = "PAT-1",
    headers: dict[str, str] | None = None,
    filename: str = "study.zip",
) -> Any:
    return client.post(
        DIAGNOSE,
        files={"file": (filename, archive, "application/zip")},
        data={"patient_id": patient_id},
        headers=headers or {},
    )


def assert_problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    """An RFC 9457 problem with this status and stable type, carrying the request id."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["type"] == f"https://covidct.example/problems/{type_}", body
    assert body["status"] == status and body["title"] and isinstance(body["detail"], str)
    assert body["request_id"] == response.headers["x-request-id"] != "-"
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    return body


def check_answer(response: Any) -> str:
    """Any answer to a fuzzed upload: a 200 diagnosis or a 4xx problem, never a 5xx.

    Returns a label for counting: "200" or "<status> <type>".
    """
    status = response.status_code
    assert status < 500, (status, response.text[:500])
    if status == 200:
        body = response.json()
        assert body["diagnosis"] in {"covid", "normal", "indeterminate"}, body
        assert body["request_id"] == response.headers["x-request-id"]
        return "200"
    assert 400 <= status < 500, (status, response.text[:500])
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == status and body["request_id"] == response.headers["x-request-id"]
    return f"{status} {body['type'].rsplit('/', 1)[-1]}"


# --- apps that share one loaded model ----------------------------------------------------


def asgi_post(app: FastAPI, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, int]:
    """POST the diagnose route at the ASGI level: (status, body chunks the app asked for)."""
    sent: list[dict[str, Any]] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read == len(chunks):
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(diagnose_scope(headers), receive, send))  # type: ignore[arg-type]
    return sent[0]["status"], read


def diagnose_scope(headers: dict[str, str]) -> dict[str, Any]:
    """The ASGI scope of POST /patients/diagnose with these headers."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": DIAGNOSE, "raw_path": DIAGNOSE.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip


# --- crafted archives ------------------------------------------------------------------------


def zip_by_hand(members: list[tuple[str, bytes, int, int, int, int]]) -> bytes:
    """A zip from (name, stored data, method, crc, uncompressed size, flags) without zipfile,
    so the sizes and flags can say anything."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size, flags in members:
        offset, raw = len(out), name.encode()
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(data), size,
            len(raw), 0,
        )  # fmt: skip
        out += raw + data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc, len(data),
            size, len(raw), 0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw
    n = len(members)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), len(out), 0)
    return bytes(out + central + eocd)


def zip_bomb(size: int = 1 << 30, name: str = "IM0001.dcm") -> bytes:
    """One deflated member of `size` zero bytes (a genuine stream, right CRC), in about
    size/1000 bytes; built from one repeated full-flush deflate block in well under 1 s."""
    mib = 1 << 20
    assert size % mib == 0 and size < 1 << 32
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    stream = block * (size // mib) + c.flush()
    crc = 0
    for _ in range(size // mib):
        crc = zlib.crc32(bytes(mib), crc)
    return zip_by_hand([(name, stream, zipfile.ZIP_DEFLATED, crc, size, 0)])


def overlapping_bomb(members: int = 200, size: int = 50 << 20) -> bytes:
    """Fifield-style: many entries whose data is the same deflate stream (each entry under
    the per-member ratio limit because it claims the whole archive as its compressed data)."""
    archive = bytearray(zip_bomb(size))
    end = archive.find(b"PK\x01\x02")
    record = archive[end : archive.find(b"PK\x05\x06")]
    central = bytearray()
    for i in range(members):
        entry = bytearray(record)
        struct.pack_into("<I", entry, 20, end)  # compressed size: the whole data region
        entry[46:] = f"IM{i:04d}.dcm".encode()[: len(entry) - 46].ljust(len(entry) - 46, b"_")
        central += entry
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, members, members, len(central), end, 0)
    return bytes(archive[:end] + central + eocd)


def nested_zip(inner: bytes) -> bytes:
    return zip_files([("inner.zip", inner)])


def encrypted(archive: bytes) -> bytes:
    data = bytearray(archive)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(sig, at + 4)
    return bytes(data)


def corrupt_deflate(member: bytes) -> bytes:
    """A deflated member whose compressed data is garbage in the middle (CRC kept)."""
    archive = bytearray(zip_files([("IM0001.dcm", member)], compress=True))
    start = 30 + len("IM0001.dcm")
    for i in range(start + 100, start + 400):
        archive[i] ^= 0x5A
    return bytes(archive)


# --- images --------------------------------------------------------------------------------


def p002_slice(number: int = 60) -> Path:
    return P002 / f"IM{number:04d}.dcm"


def p002_tiff(number: int = 60, **kwargs: object) -> bytes:
    """A COVID-CTset-like 16-bit TIFF of a real slice (stored values as they are)."""
    return tiff_bytes(pydicom.dcmread(p002_slice(number)).pixel_array.astype(np.uint16), **kwargs)


# --- seeded mutations -------------------------------------------------------------------------

INTERESTING_32 = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFF, 0xFFFFFFFE, 0x10000, 512, 4096, 65536)  # fmt: skip
# Fields of a zip local header, a central directory record and the end record:
# (offset from the signature, struct format).
_LOCAL = [(4, "H"), (6, "H"), (8, "H"), (14, "I"), (18, "I"), (22, "I"), (26, "H"), (28, "H")]
_CENTRAL = [(4, "H"), (6, "H"), (8, "H"), (10, "H"), (16, "I"), (20, "I"), (24, "I"), (28, "H"),
            (30, "H"), (32, "H"), (34, "H"), (36, "H"), (38, "I"), (42, "I")]  # fmt: skip
_END = [(4, "H"), (6, "H"), (8, "H"), (10, "H"), (12, "I"), (16, "I"), (20, "H")]
_ZIP_RECORDS = ((b"PK\x03\x04", _LOCAL), (b"PK\x01\x02", _CENTRAL), (b"PK\x05\x06", _END))

# Elements whose values drive ingest's decisions, corrupted in place by a raw edit.
_DICOM_TAGS = [(0x0002, 0x0010), (0x0008, 0x0008), (0x0008, 0x0060), (0x0020, 0x000E),
               (0x0020, 0x0013), (0x0020, 0x0032), (0x0020, 0x0037), (0x0028, 0x0002),
               (0x0028, 0x0004), (0x0028, 0x0008), (0x0028, 0x0010), (0x0028, 0x0011),
               (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0102), (0x0028, 0x0103),
               (0x0028, 0x1052), (0x0028, 0x1053), (0x7FE0, 0x0010), (0x0008, 0x0005)]  # fmt: skip
# Semantic edits through pydicom: (keyword, candidate values).
_DICOM_VALUES: list[tuple[str, tuple[object, ...]]] = [
    ("Rows", (0, 1, 7, 511, 513, 4096, 4097, 65535)),
    ("Columns", (0, 1, 256, 1024, 65535)),
    ("BitsAllocated", (0, 1, 8, 12, 32, 64)),
    ("BitsStored", (0, 1, 8, 16, 17, 32)),
    ("HighBit", (0, 7, 15, 31)),
    ("PixelRepresentation", (0, 1, 2)),
    ("SamplesPerPixel", (0, 1, 3, 4)),
    ("PhotometricInterpretation", ("MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "", "X")),
    ("NumberOfFrames", ("0", "2", "-1", "100000", "abc", "1e9")),
    ("RescaleSlope", ("0", "-1", "1e308", "nan", "inf", "abc", "", "1\\2")),
    ("RescaleIntercept", ("0", "-1024", "1e308", "-inf", "nan", " x ", "")),
    ("ImagePositionPatient", (["a", "b", "c"], [1, 2], [1e308, 0, 0], ["nan", 0, 0])),
    ("ImageOrientationPatient", ([0, 0, 0, 0, 0, 0], [1, 0, 0], ["x"] * 6)),
    ("Modality", ("MR", "", "CT\\MR")),
    ("ImageType", (["LOCALIZER"], [], ["ORIGINAL", "PRIMARY", "LOCALIZER"])),
    ("SpecificCharacterSet", ("DOE^JOHN", "ISO_IR 999", "ISO 2022 IR 13\\ISO_IR 192")),
    ("SeriesInstanceUID", ("", "1.2.3", "x" * 64)),
    ("InstanceNumber", ("", "-5", "abc", "99999999999999")),
]
_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.100",
    "1.2.3.4.5.6", "",
)  # fmt: skip


def _header_biased(rng: random.Random, n: int) -> int:
    """A position, half the time within the first 4 KiB (where the headers are)."""
    return rng.randrange(min(n, 4096)) if rng.random() < 0.5 else rng.randrange(n)


def bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 8, 32))):
        out[_header_biased(rng, len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def insert_bytes(data: bytes, rng: random.Random) -> bytes:
    at = _header_biased(rng, len(data))
    junk = rng.choice((b"\x00", b"\xff" * 4, rng.randbytes(rng.randrange(1, 64)), b"PK\x03\x04"))
    return data[:at] + junk + data[at:]


def delete_bytes(data: bytes, rng: random.Random) -> bytes:
    at = _header_biased(rng, len(data))
    return data[:at] + data[at + rng.randrange(1, 256) :]


def interesting_ints(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        at = _header_biased(rng, max(len(out) - 4, 1))
        width, fmt = rng.choice(((2, "<H"), (4, "<I"), (2, ">H"), (4, ">I")))
        value = rng.choice(INTERESTING_32) & ((1 << (8 * width)) - 1)
        out[at : at + width] = struct.pack(fmt, value)
    return bytes(out)


def zip_field(archive: bytes, rng: random.Random) -> bytes:
    """One field of a local header, central directory record or end record set to an
    interesting value (sizes, offsets, counts, flags, method, name and extra lengths)."""
    out = bytearray(archive)
    signature, fields = rng.choice(_ZIP_RECORDS)
    places = [i for i in range(len(out)) if out.startswith(signature, i)][:64]
    if not places:
        return bit_flips(archive, rng)
    at = rng.choice(places)
    offset, fmt = rng.choice(fields)
    if at + offset + struct.calcsize(fmt) <= len(out):
        value = rng.choice(INTERESTING_32) & (0xFFFF if fmt == "H" else 0xFFFFFFFF)
        struct.pack_into("<" + fmt, out, at + offset, value)
    return bytes(out)


def dicom_raw_tag(data: bytes, rng: random.Random) -> bytes:
    """An element's VR, length or value bytes overwritten, found by its tag bytes."""
    out = bytearray(data)
    group, element = rng.choice(_DICOM_TAGS)
    at = out.find(struct.pack("<HH", group, element))
    if at < 0:
        return interesting_ints(data, rng)
    where = at + rng.choice((4, 6, 8, 10, 12))
    width = rng.choice((1, 2, 4))
    out[where : where + width] = rng.choice(
        (b"\x00" * width, b"\xff" * width, rng.randbytes(width), b"UN\x00\x00"[:width])
    )
    return bytes(out)


def dicom_value(data: bytes, rng: random.Random) -> bytes:
    """A semantic edit through pydicom: a decision-driving element given an odd value,
    deleted, or the transfer syntax swapped; raw corruption when pydicom cannot write it."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        choice = rng.random()
        if choice < 0.15:
            ds.file_meta.TransferSyntaxUID = rng.choice(_TRANSFER_SYNTAXES)
        elif choice < 0.3:
            keyword = rng.choice([k for k, _ in _DICOM_VALUES] + ["PixelData"])
            if keyword in ds:
                delattr(ds, keyword)
        elif choice < 0.4 and "PixelData" in ds:
            pixels = ds.PixelData
            ds.PixelData = (
                pixels[: rng.randrange(len(pixels))]
                if rng.random() < 0.7
                else (pixels + rng.randbytes(rng.randrange(1, 4096)))
            )
        else:
            keyword, values = rng.choice(_DICOM_VALUES)
            setattr(ds, keyword, rng.choice(values))
        return dicom_bytes(ds)
    except Exception:
        return dicom_raw_tag(data, rng)


def tiff_ifd(data: bytes, rng: random.Random) -> bytes:
    """A TIFF header or first-IFD field corrupted: the IFD offset, the entry count, or one
    entry's tag, type, count or value/offset."""
    out = bytearray(data)
    if out[:2] not in (b"II", b"MM") or len(out) < 16:
        return bit_flips(data, rng)
    e = "<" if out[:2] == b"II" else ">"
    if out[2:4] in (b"\x2b\x00", b"\x00\x2b"):  # BigTIFF: header fields only
        return interesting_ints(data, rng)
    ifd = struct.unpack_from(e + "I", out, 4)[0]
    if rng.random() < 0.1 or ifd + 2 > len(out):
        struct.pack_into(e + "I", out, 4, rng.choice(INTERESTING_32))
        return bytes(out)
    count = struct.unpack_from(e + "H", out, ifd)[0]
    if rng.random() < 0.1 or count == 0:
        new_count = rng.choice((0, 1, 0xFFFF, count + 1, count * 50)) & 0xFFFF
        struct.pack_into(e + "H", out, ifd, new_count)
        return bytes(out)
    entry = ifd + 2 + 12 * rng.randrange(count)
    if entry + 12 > len(out):
        return bit_flips(data, rng)
    offset, fmt = rng.choice(((0, "H"), (2, "H"), (4, "I"), (8, "I"), (8, "H")))
    value = rng.choice((*INTERESTING_32, 1, 2, 3, 8, 16, 32, 259, 277, 339))
    struct.pack_into(e + fmt, out, entry + offset, value & (0xFFFF if fmt == "H" else 0xFFFFFFFF))
    return bytes(out)


Mutator = Callable[[bytes, random.Random], bytes]
BYTE_MUTATORS: tuple[Mutator, ...] = (
    bit_flips,
    truncate,
    insert_bytes,
    delete_bytes,
    interesting_ints,
)
DICOM_MUTATORS: tuple[Mutator, ...] = (dicom_value, dicom_value, dicom_raw_tag, *BYTE_MUTATORS)
TIFF_MUTATORS: tuple[Mutator, ...] = (tiff_ifd, tiff_ifd, *BYTE_MUTATORS)
ZIP_MUTATORS: tuple[Mutator, ...] = (zip_field, zip_field, *BYTE_MUTATORS)


def seed_corpus() -> list[tuple[str, str, bytes]]:
    """(kind, member name, bytes) of small real inputs: single slices only, so a mutation
    that stays valid costs one slice of model time (or none: the abdomen slice has no lung)."""
    abdomen = sorted((VARIANTS / "abdomen-no-lung-series").glob("*.dcm"))[0]
    tcga = sorted((VARIANTS / "tcga-luad-single-slices").glob("*.dcm"))
    return [
        ("dicom", "P002/IM0060.dcm", p002_slice(60).read_bytes()),  # JPEG Lossless, lung
        ("dicom", "A/IM0001.dcm", abdomen.read_bytes()),  # JPEG 2000, no lung
        ("dicom", "T/ID_0000.dcm", tcga[0].read_bytes()),  # uncompressed, explicit VR
        ("dicom", "T/ID_0001.dcm", tcga[1].read_bytes()),
        ("dicom", "V/jpegls.dcm", (VARIANTS / "chest-jpeg-ls-near-lossless.dcm").read_bytes()),
        ("dicom", "V/mf.dcm", (VARIANTS / "enhanced-ct-2-frames.dcm").read_bytes()),
        ("tiff", "S/IM00001.tif", p002_tiff(60)),
        ("tiff", "S/IM00002.tif", p002_tiff(20, compression="zlib")),
    ]


def series_corpus() -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Small real series (3-4 slices), for mutations that matter only between slices:
    positions, series UIDs, sizes, duplicates."""
    abdomen = sorted((VARIANTS / "abdomen-no-lung-series").glob("*.dcm"))[:3]
    return [
        ("dicom", [(f"P002/IM{i:04d}.dcm", p002_slice(i).read_bytes()) for i in range(58, 62)]),
        ("tiff", [(f"S/IM{i:05d}.tif", p002_tiff(i)) for i in range(58, 61)]),
        ("dicom", [(f"A/{p.name}", p.read_bytes()) for p in abdomen]),
    ]


def mutated_uploads(
    seed: int,
    corpus: list[tuple[str, str, bytes]],
    series: list[tuple[str, list[tuple[str, bytes]]]] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """An endless seeded stream of (mutation label, zip archive): mostly one mutated file;
    with `series`, one upload in five is a series with some of its slices mutated."""
    rng = random.Random(seed)
    while True:
        compress = rng.random() < 0.5
        if series and rng.random() < 0.2:
            kind, members = rng.choice(series)
            mutator = rng.choice(DICOM_MUTATORS if kind == "dicom" else TIFF_MUTATORS)
            hit = set(rng.sample(range(len(members)), rng.randint(1, len(members))))
            mutated = [
                (name, _repeat(mutator, data, rng) if i in hit else data)
                for i, (name, data) in enumerate(members)
            ]
            yield f"{kind}-series:{mutator.__name__}", zip_files(mutated, compress=compress)
            continue
        kind, name, data = rng.choice(corpus)
        if rng.random() < 0.3:  # the container itself
            mutator = rng.choice(ZIP_MUTATORS)
            archive = zip_files([(name, data)], compress=compress)
            yield f"zip:{mutator.__name__}", _repeat(mutator, archive, rng)
            continue
        mutator = rng.choice(DICOM_MUTATORS if kind == "dicom" else TIFF_MUTATORS)
        member = _repeat(mutator, data, rng)
        yield f"{kind}:{mutator.__name__}", zip_files([(name, member)], compress=compress)


def _repeat(mutator: Mutator, data: bytes, rng: random.Random) -> bytes:
    for _ in range(1 if rng.random() < 0.7 else rng.randrange(2, 5)):
        if not data:
            break
        data = mutator(data, rng)
    return data
