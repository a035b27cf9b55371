"""POST /patients/diagnose end to end: real HTTP through the ASGI app, the real CT series in
../shared/data.

Every expected value comes from outside the answer under test: the open-lung rule and the
stored values are computed here from the files (tests/support.py), the probabilities by
calling the SavedModel directly, and the patient rule's k and n from a stand-in model whose
scores the test knows in advance.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from dark_lung import DARK_CUTOFF, DarkLungModel
from fastapi.testclient import TestClient

from app.contract import read_card
from shared_data import NORMAL002, P002, VARIANTS, needs_data, zip_dirs, zip_files
from support import (
    BATCH_ATOL,
    paper_rule,
    sharing_app,
    started,
    stored_values,
)

pytestmark = needs_data


def post(client: TestClient, archive: bytes, patient_id: str = "PAT-1", **form: Any) -> Any:
    return client.post(
        "/patients/diagnose",
        files={"file": ("study.zip", archive, "application/zip")},
        data={"patient_id": patient_id, **{k: str(v) for k, v in form.items()}},
    )


def required(n: int, t: float) -> int:
    """max(1, ceil(t·n)), by hand (the 1e-9 keeps 0.1·30 at 3)."""
    return max(1, math.ceil(t * n - 1e-9))


@pytest.fixture(scope="module")
def p002_files() -> list[Path]:
    return sorted(P002.glob("*.dcm"))


@pytest.fixture(scope="module")
def p002_stack(p002_files: list[Path]) -> np.ndarray:
    return np.stack([stored_values(p) for p in p002_files])


@pytest.fixture(scope="module")
def p002_mask(p002_stack: np.ndarray) -> np.ndarray:
    counts, mask = paper_rule(p002_stack)
    assert counts.max() >= 500 and 10 < mask.sum() < 133  # open lung: part of the series
    return mask


# --- the served SavedModel, on P002 ----------------------------------------------------------


@pytest.fixture(scope="module")
def p002_response(client: TestClient, p002_files: list[Path]) -> dict[str, Any]:
    # Members shuffled in the archive: the order in the answer must come from the geometry.
    files = [(f"P002/{p.name}", p) for p in p002_files]
    random.Random(7).shuffle(files)
    r = post(client, zip_files(files), patient_id="P002")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def checked(p002_mask: np.ndarray) -> np.ndarray:
    """8 of the selected slices, spread over the series: those scored directly below."""
    selected = np.flatnonzero(p002_mask)
    return selected[np.linspace(0, len(selected) - 1, 8).round().astype(int)]


@pytest.fixture(scope="module")
def direct(test_model_dir: Path, p002_stack: np.ndarray, checked: np.ndarray) -> np.ndarray:
    """The SavedModel called directly, not through the service, on the checked slices."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(test_model_dir)).signatures["serving_default"]
    batch = p002_stack[checked].astype(np.float32)[..., None]
    scores = [fn(slices=tf.constant(batch[a : a + 4]))["covid_probability"] for a in (0, 4)]
    return np.concatenate([s.numpy() for s in scores])


@pytest.mark.slow
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


@pytest.mark.slow
def test_p002_selection_is_exactly_the_papers_rule(
    p002_response: dict[str, Any], p002_stack: np.ndarray, p002_mask: np.ndarray
) -> None:
    counts, _ = paper_rule(p002_stack)
    slices = p002_response["series"][0]["slices"]
    assert [s["dark_pixels"] for s in slices] == counts.tolist()
    assert [s["selected"] for s in slices] == p002_mask.tolist()


@pytest.mark.slow
def test_p002_probabilities_come_from_the_savedmodel(
    p002_response: dict[str, Any],
    p002_mask: np.ndarray,
    checked: np.ndarray,
    direct: np.ndarray,
) -> None:
    slices = p002_response["series"][0]["slices"]
    scored = [s["covid_probability"] is not None for s in slices]
    assert scored == p002_mask.tolist()  # every selected slice, and no other
    assert np.ptp(direct) > 100 * BATCH_ATOL, "the seeded test model must give varying scores"
    got = np.array([slices[i]["covid_probability"] for i in checked])
    np.testing.assert_allclose(got, direct, atol=BATCH_ATOL)


@pytest.mark.slow
def test_p002_envelope(p002_response: dict[str, Any], p002_mask: np.ndarray) -> None:
    r = p002_response
    n = int(p002_mask.sum())
    assert (r["n"], r["threshold"], r["required"]) == (n, 0.1, required(n, 0.1))
    assert r["diagnosis"] in {"covid", "normal"}  # judged: which one, the stand-in tests say
    assert r["patient_id"] == "P002"
    assert r["deciding_series"] == 1
    assert len(r["request_id"]) >= 8
    assert set(r["timings_ms"]) == {"ingest", "select", "infer", "diagnose"}
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


@pytest.mark.slow
def test_tiff_series_gives_the_rules_mask_and_the_models_probabilities(
    client: TestClient,
    p002_stack: np.ndarray,
    p002_mask: np.ndarray,
    checked: np.ndarray,
    direct: np.ndarray,
) -> None:
    r = post(client, tiff_zip(p002_stack), patient_id="P002-tiff")
    assert r.status_code == 200, r.text
    (series,) = r.json()["series"]
    assert series["kind"] == "tiff"
    slices = series["slices"]
    assert [s["source"] for s in slices] == [f"SR_3/IM{i:05d}.tif" for i in range(1, 134)]
    assert [s["selected"] for s in slices] == p002_mask.tolist()
    got = np.array([slices[i]["covid_probability"] for i in checked])
    np.testing.assert_allclose(got, direct, atol=BATCH_ATOL)


@pytest.mark.slow
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


# --- the patient rule, with a stand-in model whose scores are known ------------------------


def expected_k(stack: np.ndarray) -> tuple[int, int]:
    """(k, n) of a series under DarkLungModel: computed here from the decoded files."""
    counts, mask = paper_rule(stack)
    return int((counts[mask] > DARK_CUTOFF).sum()), int(mask.sum())


@pytest.fixture(scope="module")
def judging(test_model_dir: Path) -> Iterator[TestClient]:
    """The real app with DarkLungModel in place of the SavedModel."""
    model = DarkLungModel(read_card(test_model_dir))
    with started(sharing_app(model, test_model_dir, decode_workers=0)) as client:
        yield client


@pytest.mark.parametrize(("t", "outcome"), [(0.1, "covid"), (0.5, "normal")])
def test_patient_rule_k_of_n(
    judging: TestClient, p002_stack: np.ndarray, t: float, outcome: str
) -> None:
    k, n = expected_k(p002_stack)
    # The two thresholds fall on either side of k: one case of each outcome.
    assert required(n, 0.1) <= k < required(n, 0.5)
    body = post(judging, zip_dirs(P002), threshold=t).json()
    assert (body["k"], body["n"], body["required"], body["threshold"]) == (k, n, required(n, t), t)
    assert body["diagnosis"] == outcome
    assert body["series"][0]["verdict"]["outcome"] == outcome


def test_two_series_are_each_judged_and_the_covid_one_decides(judging: TestClient) -> None:
    p002 = expected_k(np.stack([stored_values(p) for p in sorted(P002.glob("*.dcm"))]))
    normal = expected_k(np.stack([stored_values(p) for p in sorted(NORMAL002.glob("*.dcm"))]))
    assert p002[0] >= required(p002[1], 0.1) and normal[0] == 0
    r = post(judging, zip_dirs(P002, NORMAL002), patient_id="two")
    assert r.status_code == 200, r.text
    body = r.json()
    by_size = {s["slices_total"]: s for s in body["series"]}
    assert sorted(by_size) == [133, 167]
    assert (by_size[133]["verdict"]["k"], by_size[133]["verdict"]["n"]) == p002
    assert (by_size[167]["verdict"]["k"], by_size[167]["verdict"]["n"]) == normal
    assert by_size[133]["verdict"]["outcome"] == "covid"
    assert by_size[167]["verdict"]["outcome"] == "normal"
    assert body["diagnosis"] == "covid"
    assert body["deciding_series"] == by_size[133]["index"]
    assert (body["k"], body["n"]) == p002


def test_threshold_per_request(judging: TestClient, p002_files: list[Path]) -> None:
    six = p002_files[60:66]
    _, n = expected_k(np.stack([stored_values(p) for p in six]))
    archive = zip_files((p.name, p) for p in six)
    zero = post(judging, archive, threshold=0).json()
    assert (zero["threshold"], zero["n"], zero["required"]) == (0, n, 1)
    default = post(judging, archive).json()
    assert (default["threshold"], default["required"]) == (0.1, required(n, 0.1))
    one = post(judging, archive, threshold=1).json()
    assert (one["threshold"], one["required"]) == (1, n)


# --- no model call ------------------------------------------------------------------------


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


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "abc"])
def test_threshold_outside_unit_interval_is_422_problem(client: TestClient, bad: str) -> None:
    r = post(client, zip_files([("a.dcm", P002 / "IM0060.dcm")]), threshold=bad)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/invalid-request") and body["request_id"]
    assert bad not in body["detail"]
