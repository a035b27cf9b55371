"""API keys: off by default; when configured, POST /patients/diagnose needs one of them in
X-API-Key (401 problem+json otherwise, decided before the body is read, compared in
constant time), while /health, /health/live and /metrics stay open."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app import guard
from app.settings import Settings
from hostile import DIAGNOSE, asgi_post, p002_slice, post
from hostile import assert_problem as problem
from shared_data import needs_data, zip_files
from support import sharing_app, started

pytestmark = [needs_data, pytest.mark.usefixtures("production_warning_filters")]


KEYS = ["first-key-0123456789abcdef", "second-key-fedcba9876543210"]


@pytest.fixture(scope="module")
def predictor(client: TestClient) -> Any:
    return client.app.state.runtime.engine.predictor  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def keyed(predictor: Any, test_model_dir: Path) -> Iterator[TestClient]:
    with started(sharing_app(predictor, test_model_dir, api_keys=KEYS)) as client:
        yield client


@pytest.fixture(scope="module")
def valid_zip() -> bytes:
    return zip_files([("P002/IM0060.dcm", p002_slice(60))])


def test_keys_are_off_by_default(client: TestClient, valid_zip: bytes) -> None:
    assert Settings(_env_file=None).api_keys == []  # type: ignore[call-arg]
    assert post(client, valid_zip).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEYS[0][:-1]},  # a prefix
        {"X-API-Key": KEYS[0] + "x"},
        {"X-API-Key": KEYS[0].upper()},
        {"Authorization": f"Bearer {KEYS[0]}"},  # the right key in the wrong header
        {"X-API-Key": f"{KEYS[0]},{KEYS[1]}"},
    ],
    ids=["none", "empty", "wrong", "prefix", "longer", "case", "bearer", "both"],
)
def test_missing_or_wrong_key_is_401(
    keyed: TestClient, valid_zip: bytes, headers: dict[str, str]
) -> None:
    r = post(keyed, valid_zip, headers=headers)
    body = problem(r, 401, "unauthorized")
    assert "X-API-Key" in body["detail"]
    assert "X-API-Key" in r.headers["www-authenticate"]
    for key in KEYS:
        assert key not in r.text


@pytest.mark.parametrize("key", KEYS)
def test_any_configured_key_is_accepted(keyed: TestClient, valid_zip: bytes, key: str) -> None:
    r = post(keyed, valid_zip, patient_id="KEYED", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert r.json()["patient_id"] == "KEYED"


def test_health_and_metrics_stay_open(keyed: TestClient) -> None:
    for path in ("/health", "/health/live", "/metrics"):
        assert keyed.get(path).status_code == 200, path


def test_key_is_checked_before_the_body_is_read(predictor: Any, test_model_dir: Path) -> None:
    app = sharing_app(predictor, test_model_dir, api_keys=KEYS, max_upload_bytes=1 << 20)
    form = {"content-type": "multipart/form-data; boundary=b"}
    chunks = [bytes(64 << 10)] * 64
    assert asgi_post(app, form, chunks) == (401, 0)
    # Before the size limit too: an anonymous client learns nothing about the limits.
    assert asgi_post(app, {**form, "content-length": str(10 << 20)}, chunks) == (401, 0)
    over = {**form, "content-length": str(10 << 20), "x-api-key": KEYS[1]}
    assert asgi_post(app, over, chunks) == (413, 0)


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return compare(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", counting)
    keys = Settings(_env_file=None, api_keys=[*KEYS, "third-key"]).guard_config().api_keys  # type: ignore[call-arg]
    for given in (KEYS[0], KEYS[1], "third-key", "nope", "", None):
        calls.clear()
        guard.api_key_valid(given, keys)
        # One comparison per configured key, all of digests of equal length.
        assert calls == [64, 64, 64], given


def test_keys_from_the_environment_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDCT_API_KEYS", f'["{KEYS[0]}", "{KEYS[1]}"]')
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert [k.get_secret_value() for k in settings.api_keys] == KEYS
    config = settings.service_config()
    assert guard.api_key_valid(KEYS[1], config.guard.api_keys)
    assert not guard.api_key_valid(KEYS[1][:-1], config.guard.api_keys)
    for shown in (repr(settings), str(settings.model_dump()), repr(config)):
        assert KEYS[0] not in shown and KEYS[1] not in shown


@pytest.mark.parametrize("keys", [[""], ["  "], [KEYS[0], ""]])
def test_an_empty_key_is_refused_at_start(keys: list[str]) -> None:
    # An empty configured key would match a request without the header.
    with pytest.raises(ValidationError, match="empty key"):
        Settings(_env_file=None, api_keys=keys)  # type: ignore[call-arg]


def test_the_openapi_document_declares_the_key(keyed: TestClient) -> None:
    doc = keyed.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= next(
        iter(schemes.values())
    ).items()
    assert doc["paths"][DIAGNOSE]["post"]["security"]
    assert "security" not in doc["paths"]["/health"]["get"]
