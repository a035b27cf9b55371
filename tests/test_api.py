"""POST /patients/diagnose end to end: real HTTP through the ASGI app, the real SavedModel,
the real CT series in ../shared/data."""

from __future__ import annotations

import io
import itertools
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import tifffile
from fastapi.testclient import TestClient

from shared_data import NORMAL002, P002, VARIANTS, needs_data, zip_dirs, zip_files

pytestmark = needs_data


def post(client: TestClient, archive: bytes, patient_id: str = "PAT-1", **form: Any):
    return client.post(
        "/patients/diagnose",
        files={"file": ("study.zip", archive, "application/zip")},
        data={"patient_id": patient_id, **{k: str(v) for k, v in form.items()}},
    )


def stored_values(path: Path) -> np.ndarray:
    """Independent reference: HU + 1024 from the file's own rescale, clipped at 0."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(hu + 1024, 0, None)


@pytest.fixture(scope="module")
def p002_files() -> list[Path]:
    return sorted(P002.glob("*.dcm"))


@pytest.fixture(scope="module")
def p002_stack(p002_files: list[Path]) -> np.ndarray:
    return np.stack([stored_values(p) for p in p002_files])


@pytest.fixture(scope="module")
def p002_response(client: TestClient, p002_files: list[Path]) -> dict[str, Any]:
    # Members shuffled in the archive: the order in the answer must come from the geometry.
    files = [(f"P002/{p.name}", p) for p in p002_files]
    random.Random(7).shuffle(files)
    r = post(client, zip_files(files), patient_id="P002")
    assert r.status_code == 200, r.text
    return r.json()


def test_p002_all_slices_in_geometric_order_head_to_feet(p002_response: dict[str, Any]) -> None:
    (series,) = p002_response["series"]
    slices = series["slices"]
    assert len(slices) == series["slices_total"] == 133
    assert [s["source"] for s in slices] == [f"P002/IM{i:04d}.dcm" for i in range(1, 134)]
    positions = [s["position_mm"] for s in slices]
    assert all(a > b for a, b in itertools.pairwise(positions))
    assert positions[0] == pytest.approx(-173.7, abs=0.5)
    assert positions[-1] == pytest.approx(-437.7, abs=0.5)
    assert "head" in series["order"].lower() or "superior" in series["order"].lower()


def test_p002_selection_is_exactly_the_papers_rule(
    p002_response: dict[str, Any], p002_stack: np.ndarray
) -> None:
    # Reference computed here, independently of app.selection.
    roi = p002_stack[:, 240:340, 120:370]
    counts = (roi < 300).sum(axis=(1, 2))
    mask = counts > (counts.max() - counts.min()) / 1.5
    slices = p002_response["series"][0]["slices"]
    assert [s["dark_pixels"] for s in slices] == counts.tolist()
    assert [s["selected"] for s in slices] == mask.tolist()
    assert 10 < mask.sum() < 133  # the rule keeps the open-lung part of a chest series


def test_p002_probabilities_come_from_the_savedmodel(
    p002_response: dict[str, Any], p002_stack: np.ndarray, test_model_dir: Path
) -> None:
    import tensorflow as tf

    slices = p002_response["series"][0]["slices"]
    selected = [i for i, s in enumerate(slices) if s["selected"]]
    scores = np.array([slices[i]["covid_probability"] for i in selected])
    assert all(s["covid_probability"] is None for s in slices if not s["selected"])
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores.std() > 0.01, "seeded test model must give varying scores"

    fn = tf.saved_model.load(str(test_model_dir)).signatures["serving_default"]
    some = selected[:: max(1, len(selected) // 4)][:4]
    batch = p002_stack[some].astype(np.float32)[..., None]
    expected = fn(slices=tf.constant(batch))["covid_probability"].numpy()
    np.testing.assert_allclose(scores[[selected.index(i) for i in some]], expected, atol=1e-5)


def test_p002_patient_threshold_and_envelope(p002_response: dict[str, Any]) -> None:
    r = p002_response
    slices = r["series"][0]["slices"]
    scores = [s["covid_probability"] for s in slices if s["selected"]]
    n, k = len(scores), sum(p > 0.5 for p in scores)
    assert (r["n"], r["k"], r["threshold"]) == (n, k, 0.1)
    assert r["required"] == max(1, math.ceil(0.1 * n - 1e-9))
    assert r["diagnosis"] == ("covid" if k >= r["required"] else "normal")
    assert r["patient_id"] == "P002"
    assert r["deciding_series"] == 1
    assert len(r["request_id"]) >= 8
    assert {"decode", "select", "infer", "diagnose"} <= set(r["timings_ms"])
    assert r["model"]["weights_source"] == "untrained" and r["model"]["untrained"]
    assert any("UNTRAINED" in w for w in r["warnings"])


def tiff_zip(stack: np.ndarray, folder: str = "SR_3") -> bytes:
    """The COVID-CTset format: one 16-bit TIFF per slice, raw stored values, IM00001.tif …"""
    files = []
    for i, img in enumerate(stack, start=1):
        buf = io.BytesIO()
        tifffile.imwrite(buf, img.astype(np.uint16))
        files.append((f"{folder}/IM{i:05d}.tif", buf.getvalue()))
    random.Random(3).shuffle(files)
    return zip_files(files)


def test_tiff_series_gives_same_mask_and_probabilities(
    client: TestClient, p002_response: dict[str, Any], p002_stack: np.ndarray
) -> None:
    r = post(client, tiff_zip(p002_stack), patient_id="P002-tiff")
    assert r.status_code == 200, r.text
    (series,) = r.json()["series"]
    assert series["kind"] == "tiff"
    dicom = p002_response["series"][0]["slices"]
    tiff = series["slices"]
    assert [s["source"] for s in tiff] == [f"SR_3/IM{i:05d}.tif" for i in range(1, 134)]
    assert [s["selected"] for s in tiff] == [s["selected"] for s in dicom]
    a = np.array([s["covid_probability"] for s in dicom if s["selected"]])
    b = np.array([s["covid_probability"] for s in tiff if s["selected"]])
    np.testing.assert_allclose(b, a, atol=1e-4)
    assert r.json()["diagnosis"] == p002_response["diagnosis"]


def test_two_series_are_each_judged_and_combined(client: TestClient) -> None:
    r = post(client, zip_dirs(P002, NORMAL002), patient_id="two")
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["series"]) == 2
    assert sorted(s["slices_total"] for s in body["series"]) == [133, 167]
    verdicts = [s["verdict"]["outcome"] for s in body["series"]]
    assert all(v in {"covid", "normal"} for v in verdicts)
    expected = "covid" if "covid" in verdicts else "normal"
    assert body["diagnosis"] == expected
    deciding = next(s for s in body["series"] if s["index"] == body["deciding_series"])
    assert (body["k"], body["n"]) == (deciding["verdict"]["k"], deciding["verdict"]["n"])
    if expected == "covid":
        assert deciding["verdict"]["outcome"] == "covid"


def test_abdomen_without_lung_is_indeterminate_not_normal(client: TestClient) -> None:
    r = post(client, zip_dirs(VARIANTS / "abdomen-no-lung-series"))
    assert r.status_code == 200, r.text
    body = r.json()
    (series,) = body["series"]
    assert series["slices_total"] == 20
    assert series["selection"]["selected"] == 3  # the relative rule still keeps 3 slices
    assert series["selection"]["max_dark_pixels"] == 17
    assert not series["selection"]["has_lung"]
    assert body["diagnosis"] == "indeterminate"
    assert (body["k"], body["n"]) == (0, 0)
    assert all(s["covid_probability"] is None for s in series["slices"])


def test_variants_domain_multiframe_and_localizer(client: TestClient) -> None:
    names = [
        "tcga-luad-single-slices/ID_0052.dcm",  # stores HU directly (intercept 0)
        "tcga-luad-single-slices/ID_0000.dcm",  # intercept -1024
        "chest-jpeg2000-intercept0.dcm",
        "chest-topogram-400x512.dcm",
        "enhanced-ct-2-frames.dcm",
    ]
    r = post(client, zip_files((n, VARIANTS / n) for n in names))
    assert r.status_code == 200, r.text
    body = r.json()
    by_source: dict[str, list[dict[str, Any]]] = {}
    for s in body["series"]:
        for sl in s["slices"]:
            by_source.setdefault(sl["source"], []).append(sl)
    assert "chest-topogram-400x512.dcm" not in by_source
    assert len(body["skipped"]) == 1 and "locali" in body["skipped"][0]["reason"].lower()
    assert len(by_source["enhanced-ct-2-frames.dcm"]) == 2
    # Mid-chest slices in the same domain: the lungs are dark (< 300) in both, whatever
    # the intercept; in raw HU (no conversion) the intercept-0 lung would be < 300 everywhere.
    for name in names[:3]:
        (sl,) = by_source[name]
        assert 2000 < sl["dark_pixels"] < 25000, (name, sl["dark_pixels"])


def test_threshold_per_request(client: TestClient, p002_files: list[Path]) -> None:
    archive = zip_files((p.name, p) for p in p002_files[60:66])
    zero = post(client, archive, threshold=0).json()
    assert zero["threshold"] == 0 and zero["required"] == 1
    default = post(client, archive).json()
    assert default["threshold"] == 0.1
    one = post(client, archive, threshold=1).json()
    assert one["required"] == one["n"]


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "abc"])
def test_threshold_outside_unit_interval_is_422_problem(client: TestClient, bad: str) -> None:
    r = post(client, zip_files([("a.dcm", P002 / "IM0060.dcm")]), threshold=bad)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/invalid-request") and body["request_id"]
    assert bad not in body["detail"]
