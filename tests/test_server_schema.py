"""The server's OpenAPI schema describes what the server does: schemathesis
generates requests from /schema/openapi.json for every operation and checks
each answer (no 5xx; a status, content type, headers and body the schema
documents for that operation). Bounded: a few examples per operation, answers
capped at 2 tokens, the model folders and Hugging Face cache empty ones."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

from server_util import Server

KEY = "schema-key"
CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no-models")
    with Server("--api-key", KEY, "--max-tokens", "2", "--parallel", "2",
                env={"HF_HOME": str(empty / "hf"), "FERMI_MODELS": str(empty / "models")}) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_dict(httpx.get(server.url("/schema/openapi.json")).json())


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_as_its_schema_says(case, server):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
    if isinstance(case.body, dict):  # short answers: the point is their shape
        for cap in CAPS:
            if isinstance(case.body.get(cap), int) and case.body[cap] > 2:
                case.body[cap] = 2
    case.call_and_validate(base_url=server.base, timeout=120, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_headers_conformance, response_schema_conformance])
