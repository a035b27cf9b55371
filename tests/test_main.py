"""The wired app: its API documentation pages work without internet access (hospital
networks are often closed), and start-up wiring needs no model to answer them."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.inference import ModelConfig
from app.main import create_app
from app.settings import Settings

# Any absolute or protocol-relative URL: http://x, https://x, //x (not the "//" of a comment).
EXTERNAL = re.compile(r"""(?:https?:)?//[\w.-]+""", re.IGNORECASE)
ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


def _no_model(config: ModelConfig) -> Any:
    raise AssertionError("these tests need no model")


@pytest.fixture(scope="module")
def docs_client() -> TestClient:
    return TestClient(create_app(Settings(_env_file=None), loader=_no_model))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("page", "kinds"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"}),
    ],
)
def test_docs_pages_load_everything_from_the_service(
    docs_client: TestClient, page: str, kinds: set[str]
) -> None:
    r = docs_client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = re.sub(r"<!--.*?-->", "", r.text, flags=re.DOTALL)
    assert EXTERNAL.findall(html) == [], "the page names another host"
    assets = [a or b for a, b in ASSET.findall(html)]
    assert {a.rsplit("/", 1)[-1] for a in assets} == kinds
    for asset in assets:
        assert asset.startswith("/"), asset
        got = docs_client.get(asset)
        assert got.status_code == 200 and len(got.content) > 1000, asset


def test_swagger_ui_sends_the_document_to_no_validator(docs_client: TestClient) -> None:
    # Swagger UI's default validator badge would post the OpenAPI document to an outside host.
    assert '"validatorUrl": null' in docs_client.get("/docs").text
