"""Readiness, liveness, untrained refusal and the Prometheus endpoint, through the ASGI app."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.inference import InferenceEngine, load_engine
from app.main import create_app
from app.settings import Settings
from shared_data import P002, needs_data, zip_files
from support import make_settings, wait_ready


def test_health_is_503_until_the_model_is_loaded_and_warm(test_model_dir: Path) -> None:
    release = threading.Event()

    def slow_loader(settings: Settings) -> InferenceEngine:
        release.wait(60)
        return load_engine(settings)

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
        assert refused.status_code == 503
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["type"].endswith("/not-ready")
        release.set()
        wait_ready(client)
        body = client.get("/health").json()
        assert body["status"] == "ready"
        assert body["model_card"]["weights_source"] == "untrained"
        assert "UNTRAINED" in body["warning"]


def test_untrained_weights_refused_when_not_allowed(test_model_dir: Path) -> None:
    app = create_app(make_settings(test_model_dir, allow_untrained=False))
    with TestClient(app) as client:
        for _ in range(3000):
            r = client.get("/health")
            if r.json()["status"] != "loading":
                break
            threading.Event().wait(0.1)
        assert r.status_code == 503
        assert r.json()["status"] == "refused"
        assert "untrained" in r.json()["detail"]
        assert client.get("/health/live").status_code == 200


def test_failed_load_is_reported_not_crashed(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "missing"))
    with TestClient(app) as client:
        for _ in range(600):
            r = client.get("/health")
            if r.json()["status"] != "loading":
                break
            threading.Event().wait(0.1)
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert client.get("/health/live").status_code == 200


@needs_data
def test_metrics_after_a_diagnosis(client: TestClient) -> None:
    archive = zip_files([(p.name, p) for p in sorted(P002.glob("*.dcm"))[60:63]])
    r = client.post(
        "/patients/diagnose",
        files={"file": ("s.zip", archive, "application/zip")},
        data={"patient_id": "m"},
    )
    assert r.status_code == 200, r.text
    m = client.get("/metrics")
    assert m.status_code == 200
    assert m.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.text)
        for s in family.samples
    }
    names = {name for name, _ in samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    route = {"route": "/patients/diagnose", "method": "POST", "status": "200"}
    assert value("covidct_http_request_duration_seconds_count", **route) >= 1
    for stage in ("decode", "select", "infer", "diagnose"):
        assert value("covidct_stage_duration_seconds_count", stage=stage) >= 1
    assert value("covidct_slices_processed_total") >= 3
    assert value("covidct_slices_selected_total") >= 1
    assert any(name == "covidct_diagnoses_total" for name in names)
    assert value("covidct_inference_batch_size_count") >= 1
    assert "covidct_model_info" in names
