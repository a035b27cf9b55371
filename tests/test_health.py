"""Readiness, liveness, untrained refusal and the Prometheus endpoint, through the ASGI app.
(Draining on SIGTERM: tests/test_runtime.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.inference import InferenceEngine, ModelConfig, load_engine
from app.main import create_app
from hostile import assert_problem as problem
from shared_data import P002, needs_data, zip_files
from support import make_settings, paper_rule, stored_values, wait_loaded, wait_ready


def test_health_is_503_until_the_model_is_loaded_and_warm(test_model_dir: Path) -> None:
    release = threading.Event()

    def slow_loader(config: ModelConfig) -> InferenceEngine:
        assert release.wait(60), "the test never released the loader"
        return load_engine(config)

    app = create_app(make_settings(test_model_dir), loader=slow_loader)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.get("/health/live").status_code == 200
        refused = client.post(
            "/patients/diagnose",
            files={"file": ("a.zip", b"PK", "application/zip")},
            data={"patient_id": "x"},
        )
        problem(refused, 503, "not-ready")
        release.set()
        wait_ready(client)
        body = client.get("/health").json()
        assert body["status"] == "ready"
        assert body["model_card"]["weights_source"] == "untrained"
        assert "UNTRAINED" in body["warning"]


def test_untrained_weights_refused_when_not_allowed(test_model_dir: Path) -> None:
    app = create_app(make_settings(test_model_dir, allow_untrained=False))
    with TestClient(app) as client:
        r = wait_loaded(client)
        assert r.status_code == 503
        assert r.json()["status"] == "refused"
        assert "untrained" in r.json()["detail"]
        assert client.get("/health/live").status_code == 200


def test_failed_load_is_reported_not_crashed(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "missing"))
    with TestClient(app) as client:
        r = wait_loaded(client)
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert client.get("/health/live").status_code == 200


# --- metrics -------------------------------------------------------------------------------


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


@needs_data
def test_metrics_count_exactly_one_diagnosis(client: TestClient) -> None:
    files = sorted(P002.glob("*.dcm"))[60:63]
    # Expected slices for the model, by the paper's rule computed here on the decoded files.
    counts, mask = paper_rule(np.stack([stored_values(p) for p in files]))
    selected = int(mask.sum())
    assert counts.max() >= 500 and 1 <= selected <= 3  # open lung: the model is called once

    before = scrape(client)
    r = client.post(
        "/patients/diagnose",
        files={"file": ("s.zip", zip_files([(p.name, p) for p in files]), "application/zip")},
        data={"patient_id": "m"},
    )
    assert r.status_code == 200, r.text
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = {"route": "/patients/diagnose", "method": "POST", "status": "200"}
    assert delta("covidct_http_request_duration_seconds_count", **route) == 1
    for stage in ("ingest", "select", "infer", "diagnose"):
        assert delta("covidct_stage_duration_seconds_count", stage=stage) == 1, stage
    assert delta("covidct_stage_duration_seconds_count", stage="decode") == 0
    assert delta("covidct_slices_processed_total") == 3
    assert delta("covidct_slices_selected_total") == selected
    outcomes = ("covid", "normal", "indeterminate")
    assert sum(delta("covidct_diagnoses_total", outcome=o) for o in outcomes) == 1
    # At most 3 slices with max_batch_size 4: one model call.
    assert delta("covidct_inference_batch_size_count") == 1
    assert delta("covidct_inference_batch_size_sum") == selected
    problems = [k for k in after if k[0] == "covidct_errors_total" and delta(k[0], **dict(k[1]))]
    assert problems == []
    assert any(name == "covidct_model_info" for name, _ in after)
