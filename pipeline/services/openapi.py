"""OpenAPI 3.1 documents of the consumer services, generated from their :class:`Route` lists.

Schemas come from the msgspec shapes the handlers use (``schemas/http.py``, ``schemas/events.py``),
so the document and the implementation share one definition; tests validate the document and
every answer of every route against it. ``inferlane serve <service> --openapi`` prints it, and each
service serves it at ``GET /openapi.json``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import msgspec
from aiohttp import web

from schemas.http import ErrorBody

__all__ = ["Documented", "Handler", "Reply", "Route", "openapi_document"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Reply:
    """One documented answer of a route."""

    description: str
    shape: type[msgspec.Struct] | None = None
    media_type: str = "application/json"


@dataclass(frozen=True)
class Route:
    """One HTTP route: what registers the handler and what the OpenAPI document says."""

    method: str
    path: str
    handler: Handler
    summary: str
    replies: Mapping[int, Reply]
    body: type[msgspec.Struct] | None = None
    """Shape of the JSON request body, if any."""
    tags: Sequence[str] = field(default_factory=tuple)



class Documented(Protocol):
    """What a document is made of: a service's title, description and routes."""

    title: str
    description: str

    def routes(self) -> list[Route]: ...


_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _package_version() -> str:
    try:
        return version("inferlane")
    except PackageNotFoundError:  # running from a checkout without install
        return "0.0.0"


def _shapes(routes: list[Route]) -> list[type[msgspec.Struct]]:
    found: dict[str, type[msgspec.Struct]] = {"ErrorBody": ErrorBody}
    for route in routes:
        if route.body is not None:
            found[route.body.__name__] = route.body
        for reply in route.replies.values():
            if reply.shape is not None:
                found[reply.shape.__name__] = reply.shape
    return list(found.values())


def _content(shape: type[msgspec.Struct] | None, media_type: str) -> dict[str, Any]:
    if shape is None:
        return {media_type: {}}
    return {media_type: {"schema": {"$ref": _REF.format(name=shape.__name__)}}}


def _operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(status): {"description": reply.description,
                      "content": _content(reply.shape, reply.media_type)}
        for status, reply in sorted(route.replies.items())}
    operation: dict[str, Any] = {
        "operationId": route.handler.__name__.strip("_"),
        "summary": route.summary,
        "tags": list(route.tags),
        "responses": responses,
    }
    doc = (route.handler.__doc__ or "").strip()
    if doc:
        operation["description"] = doc
    params = _PATH_PARAM.findall(route.path)
    if params:
        operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                    "schema": {"type": "string", "minLength": 1,
                                               "maxLength": 128}} for name in params]
    if route.body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": _content(route.body, "application/json")}
        error = _content(ErrorBody, "application/json")
        responses.setdefault("400", {"description": "Invalid JSON or a field that breaks the "
                                                    "schema; `reason` names it.",
                                     "content": error})
        responses.setdefault("413", {"description": "Body larger than the service's limit.",
                                     "content": error})
    return operation


def openapi_document(service: Documented) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``service``'s routes."""
    routes = service.routes()
    _, components = msgspec.json.schema_components(_shapes(routes), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": service.title, "version": _package_version(),
                 "description": service.description},
        "paths": paths,
        "components": {"schemas": components},
    }
