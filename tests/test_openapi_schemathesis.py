"""Schema-based testing of the OpenAPI document with schemathesis, in process through the
ASGI app: generated requests (valid and invalid per the schema, the diagnose endpoint
mostly with garbage files) never get a 5xx, every error is problem+json, answers match
their documented content types and schemas, and schema-invalid requests are rejected.

Bounded: a few dozen examples per operation, no deadline.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
)

from app.inference import ModelConfig
from app.main import create_app
from app.settings import Settings
from shared_data import needs_data

pytestmark = [needs_data, pytest.mark.usefixtures("production_warning_filters")]


MAX_EXAMPLES = 50


def _no_model(config: ModelConfig) -> Any:
    raise RuntimeError("this app only serves its OpenAPI document")


# Requests go to the session's running app (model loaded and warm) once the fixture below
# has run; until then (schema loading, at import) to an app that only documents itself.
# schemathesis would start an app's lifespan itself: the wrapper declines it, the session's
# TestClient runs it. (schemathesis.pytest.from_fixture, the lazy alternative, does not
# work with pytest 9.)
_target: dict[str, Any] = {"app": create_app(Settings(_env_file=None), loader=_no_model)}  # type: ignore[call-arg]


async def running_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        raise RuntimeError("the lifespan is run by the session's TestClient")  # = unsupported
    await _target["app"](scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", running_app)


@pytest.fixture(autouse=True)
def _serve_the_session_app(client: TestClient) -> None:
    _target["app"] = client.app


def errors_are_problems(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/problem+json"), (
            response.status_code,
            content_type,
        )
    return None


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors(case: Any) -> None:
    case.call_and_validate(
        checks=[
            not_a_server_error,
            errors_are_problems,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ]
    )
