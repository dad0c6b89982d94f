"""Check an HTTP answer against a service's OpenAPI 3.1 document (shared by the service tests).

``assert_matches_openapi(doc, "POST", "/v1/recommend", 200, body)`` fails unless the document
declares that status for that route with a JSON schema, and ``body`` is valid against it
(OpenAPI 3.1 schema dialect; ``$ref`` resolved in the document's ``components``).
"""

from __future__ import annotations

from typing import Any

from openapi_schema_validator import OAS31Validator

__all__ = ["assert_matches_openapi", "route_pairs"]


def _response_schema(doc: dict[str, Any], method: str, path_template: str,
                     status: int) -> dict[str, Any]:
    operations = doc["paths"].get(path_template)
    assert operations is not None, f"{path_template} is not in the document"
    operation = operations.get(method.lower())
    assert operation is not None, f"{method} {path_template} is not in the document"
    response = operation["responses"].get(str(status))
    assert response is not None, (f"{method} {path_template} does not document status {status} "
                                  f"(documented: {sorted(operation['responses'])})")
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    assert schema is not None, f"{method} {path_template} {status}: no JSON schema"
    return dict(schema)


def assert_matches_openapi(doc: dict[str, Any], method: str, path_template: str, status: int,
                           body: Any) -> None:
    """Fail with every violation unless ``body`` is what ``doc`` says ``method path_template``
    answers with ``status``."""
    schema = _response_schema(doc, method, path_template, status)
    # The response schema is a "$ref" into the document: validate with the document's
    # components at the root so "#/components/schemas/..." resolves.
    validator = OAS31Validator({**schema, "components": doc.get("components", {})})
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, (f"{method} {path_template} {status}: body does not match the document: "
                        + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
                        + f"; body {body!r}")


def route_pairs(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """Every ``(METHOD, path template)`` the document declares."""
    return {(method.upper(), path) for path, operations in doc["paths"].items()
            for method in operations}
