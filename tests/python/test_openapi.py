"""`GET /api/v1/openapi.json` of a real `stacyvm serve` is a valid OpenAPI
3.1 document (openapi-spec-validator, pinned in scripts/test), and the
published `stacyvm` SDK's calls are all in it."""

import httpx
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator


def test_openapi_document_is_valid_3_1(server):
    doc = httpx.get(server + "/api/v1/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    for op in [
        ("POST", "/api/v1/sandboxes"),
        ("GET", "/api/v1/sandboxes/{id}"),
        ("DELETE", "/api/v1/sandboxes/{id}"),
        ("POST", "/api/v1/sandboxes/{id}/exec"),
        ("POST", "/api/v1/sandboxes/{id}/files"),
        ("GET", "/api/v1/sandboxes/{id}/files"),
        ("GET", "/api/v1/sandboxes/{id}/files/list"),
    ]:
        assert op in ops, op
    page = httpx.get(server + "/api/v1/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
