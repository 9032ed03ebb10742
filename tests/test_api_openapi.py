"""The OpenAPI description (gateway/api/openapi.json) against the routes and the answers of the app.

No schema library is a dependency, so a small JSON Schema subset checker (the keywords the
document uses) validates answers; tests/test_storage_api.py runs every API answer through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gateway.api.openapi import document
from gateway.app import create_app

from .conftest import build_settings

DOCUMENT_PATH = Path(__file__).parent.parent / "gateway" / "api" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_KEYWORDS = {
    "$ref",
    "allOf",
    "oneOf",
    "anyOf",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minProperties",
    "format",
    "description",
    "default",
    "writeOnly",
    "readOnly",
}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = document()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (the subset of JSON Schema 2020-12 the document uses)."""
    schema = resolve(schema)
    errors: list[str] = []
    for sub in schema.get("allOf", ()):
        errors += schema_errors(value, sub, where)
    for keyword in ("oneOf", "anyOf"):
        if keyword in schema:
            matching = sum(not schema_errors(value, sub, where) for sub in schema[keyword])
            if matching == 0 or (keyword == "oneOf" and matching > 1):
                errors.append(f"{where}: {matching} of the {keyword} alternatives match")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [*errors, f"{where}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}: {name!r} is missing" for name in schema.get("required", ()) if name not in value]
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{where}: fewer than {schema['minProperties']} properties")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{where}.{name}")
    if isinstance(value, list):
        if "items" in schema:
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{where}[{index}]")
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: {len(value)} items out of bounds")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{where}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value) and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{where}: {value} out of bounds")
    return errors


def operation_for(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The documented path template and operation serving `method path` (literal paths first)."""
    path = path.partition("?")[0]
    candidates = []
    for template, item in document()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            candidates.append((template.count("{"), template, item[method.lower()]))
    assert candidates, f"{method} {path} is not in the OpenAPI description"
    _, template, operation = min(candidates)
    return template, operation


def check_answer(method: str, path: str, status: int, content_type: str, text: str) -> None:
    """The answer's status is documented for its operation, and its JSON body fits the schema."""
    template, operation = operation_for(method, path)
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {template}: status {status} is not documented"
    response = resolve(responses[str(status)])
    content = response.get("content")
    if content is None:
        assert not text, f"{method} {template} {status}: documented without a body, got {text[:200]}"
        return
    assert content_type == "application/json", f"{method} {template} {status}: {content_type}"
    errors = schema_errors(json.loads(text), content["application/json"]["schema"])
    assert not errors, f"{method} {template} {status}: " + "; ".join(errors[:10])


# -- the document itself -----------------------------------------------------------------------


def walk_schemas(node: Any, where: str = "#"):
    """Every schema object in the document (under `schema`, `schemas`, and their sub-schemas)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema":
                yield from _schema_tree(value, f"{where}/{key}")
            elif key == "schemas":
                for name, schema in value.items():
                    yield from _schema_tree(schema, f"{where}/{key}/{name}")
            else:
                yield from walk_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from walk_schemas(item, f"{where}/{index}")


def _schema_tree(schema: Any, where: str):
    assert isinstance(schema, dict), where
    yield where, schema
    for key in ("allOf", "oneOf", "anyOf"):
        for index, sub in enumerate(schema.get(key, ())):
            yield from _schema_tree(sub, f"{where}/{key}/{index}")
    for name, sub in schema.get("properties", {}).items():
        yield from _schema_tree(sub, f"{where}/properties/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _schema_tree(schema[key], f"{where}/{key}")


def test_document_is_openapi_3_1():
    raw = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    assert raw == document()
    assert raw["openapi"] == "3.1.0"
    assert raw["info"]["title"] and raw["info"]["version"]
    scheme = raw["components"]["securitySchemes"]["adminToken"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert raw["security"] == [{"adminToken": []}]
    operation_ids = []
    for template, item in raw["paths"].items():
        assert template.startswith("/api/"), template
        declared = {p["name"] for p in item.get("parameters", ())}
        for method in set(item) & set(METHODS):
            operation = item[method]
            operation_ids.append(operation["operationId"])
            names = declared | {p["name"] for p in operation.get("parameters", ())}
            path_names = {
                p["name"] for p in [*item.get("parameters", ()), *operation.get("parameters", ())] if p["in"] == "path"
            }
            assert path_names == set(re.findall(r"\{([^}]+)\}", template)), (template, method)
            assert all(p.get("required") for p in item.get("parameters", ()) if p["in"] == "path")
            assert names >= path_names
            assert operation["responses"], (template, method)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status), (template, method, status)
                assert resolve(response)["description"], (template, method, status)
            if template == "/api/webhooks/label-studio":  # a shared secret or signature, not a token
                assert operation["security"] == [{"webhookSecret": []}, {"webhookSignature": []}]
                assert "401" in operation["responses"]
            elif template != "/api/openapi.json":
                assert {"401", "403"} <= set(operation["responses"]), (template, method)
                assert "security" not in operation
    assert raw["paths"]["/api/openapi.json"]["get"]["security"] == []
    assert len(operation_ids) == len(set(operation_ids))
    for where, schema in walk_schemas(raw):
        assert set(schema) <= _KEYWORDS, f"{where}: unchecked keywords {set(schema) - _KEYWORDS}"
        if "$ref" in schema:
            resolve(schema)  # every reference resolves
        if "pattern" in schema:
            re.compile(schema["pattern"])
        for name in schema.get("required", ()):
            properties = {**schema.get("properties", {})}
            assert name in properties or "allOf" in schema or not properties, f"{where}: {name}"
    storage = raw["components"]["schemas"]["Storage"]
    assert storage["properties"]["status"]["enum"] == [
        "initialized",
        "queued",
        "in_progress",
        "completed",
        "completed_with_errors",
        "failed",
    ]
    assert "google_application_credentials" not in storage["properties"]
    secret = raw["components"]["schemas"]["StorageFields"]["properties"]["google_application_credentials"]
    assert secret["writeOnly"] is True
    error = raw["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"error", "message", "validation_errors"} and error["required"] == [
        "error",
        "message",
    ]


def test_every_api_route_is_described(tmp_path):
    app = create_app(build_settings([], tmp_path))
    registered = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path") or ""
        if template.startswith("/api") and route.method != "HEAD":  # HEAD comes with every GET
            registered.add((route.method.lower(), template))
    described = {
        (method, template) for template, item in document()["paths"].items() for method in item if method in METHODS
    }
    assert registered == described
    assert len(registered) == 24


def test_the_checker_finds_mistakes():
    """The subset checker is what the API tests rely on: it must catch what it claims to."""
    storage = {"$ref": "#/components/schemas/Storage"}
    assert schema_errors({"id": 1}, storage)  # required fields missing
    page = {"total": 1, "page": 1, "page_size": 1, "has_next": False, "tasks": [{"id": 1, "project": "7", "data": {}}]}
    assert schema_errors(page, {"$ref": "#/components/schemas/TaskPage"}) == []
    assert schema_errors({**page, "extra": 1}, {"$ref": "#/components/schemas/TaskPage"})
    assert schema_errors({**page, "page_size": 1001}, {"$ref": "#/components/schemas/TaskPage"})
    assert schema_errors({**page, "has_next": 0}, {"$ref": "#/components/schemas/TaskPage"})
    error = {"error": "validation_error", "message": "x: y", "validation_errors": {"x": ["y"]}}
    assert schema_errors(error, {"$ref": "#/components/schemas/Error"}) == []
    assert schema_errors({**error, "validation_errors": {"x": "y"}}, {"$ref": "#/components/schemas/Error"})
    _, operation = operation_for("POST", "/api/storages/gcs/validate")
    assert operation["operationId"] == "validateStorage"
    _, operation = operation_for("POST", "/api/storages/gcs/validate/sync")
    assert operation["operationId"] == "syncStorage"
    _, operation = operation_for("GET", "/api/storages/gcs/validate")
    assert operation["operationId"] == "getStorage"
    reason = resolve(operation["responses"]["404"])["content"]["application/json"]["schema"]
    assert schema_errors({"error": "unknown_task", "message": "x"}, reason)
