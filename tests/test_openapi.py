"""The OpenAPI document (worker/web/openapi.yaml) against the code: the routes every
role registers, their methods and path parameters, and the bounds the handlers enforce.
What the endpoints answer is checked against it by tests/test_api_fuzz.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from aiohttp import web
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import backfill, db, runs, stuck
from worker.config import ROLES, Role, Settings, load_jobs
from worker.lease import Lease
from worker.parsing import TYPES
from worker.web import control, parsing, query, status
from worker.web.app import OPEN_ROUTES, SHELLS, WebState, build_app
from worker.web.openapi import HTTP_METHODS, document, path_parameters, routes

from .test_api import API_KEY, JOBS

MakeApp = Callable[[Role], web.Application]


@pytest.fixture
def make_app(tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str) -> MakeApp:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS, encoding="utf-8")
    settings = Settings(jobs=load_jobs(path), api_key=API_KEY, key_prefix=key_prefix)

    def make(role: Role) -> web.Application:
        state = WebState(
            settings=dataclasses.replace(settings, role=role),
            pool=pool,
            redis=redis,
            lease=Lease(redis, prefix=key_prefix),
        )
        return build_app(state)

    return make


def documented(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m for m in item if m in HTTP_METHODS} for path, item in doc["paths"].items()}


def declared_path_parameters(item: dict[str, Any], method: str) -> list[str]:
    """The names of the `in: path` parameters of one operation (its path item's and its
    own), references resolved."""
    refs = document()["components"]["parameters"]
    found = []
    for p in [*item.get("parameters", []), *item[method].get("parameters", [])]:
        p = refs[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
        if p["in"] == "path":
            found.append(p["name"])
    return found


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()
    # Only what JSON holds: YAML would read an unquoted 2026-05-01 as a date, 200 as a
    # number where OpenAPI wants the string "200".
    assert orjson.loads(orjson.dumps(doc)) == doc
    responses = [
        op["responses"]
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "responses" in op
    ]
    assert all(isinstance(status, str) for r in responses for status in r)


@pytest.mark.parametrize("role", ROLES)
def test_every_route_is_documented_and_every_documented_route_served(
    make_app: MakeApp, role: Role
) -> None:
    served = routes(make_app(role))
    doc = documented(document())
    missing = {p: sorted(m - doc.get(p, set())) for p, m in served.items()}
    missing = {p: m for p, m in missing.items() if m}
    assert not missing, f"routes of role {role} missing from openapi.yaml: {missing}"
    if role == "all":
        # Every role serves a subset of `all`: the document is exactly its routes.
        extra = {p: sorted(m - served.get(p, set())) for p, m in doc.items()}
        extra = {p: m for p, m in extra.items() if m}
        assert not extra, f"documented but not served by any role: {extra}"


def test_every_path_parameter_is_declared_and_nothing_more(make_app: MakeApp) -> None:
    served = routes(make_app("all"))
    doc = document()
    for path, methods in served.items():
        for method in methods:
            declared = declared_path_parameters(doc["paths"][path], method)
            assert declared == path_parameters(path), (method, path, declared)


@pytest.mark.parametrize("role", ROLES)
async def test_openapi_json_lists_exactly_what_the_replica_serves(
    make_app: MakeApp, aiohttp_client: AiohttpClient, role: Role
) -> None:
    app = make_app(role)
    served = routes(app)
    client = await aiohttp_client(app)
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    doc = await response.json()
    assert documented(doc) == served
    assert doc["components"] == document()["components"]
    assert doc["info"]["version"] not in ("", None)
    if role == "scheduler":
        assert set(served) == {"/healthz", "/readyz", "/metrics", "/openapi.json"}


def schema_of(name: str) -> dict[str, Any]:
    found: dict[str, Any] = document()["components"]["schemas"][name]
    return found


def parameter(path: str, method: str, name: str) -> dict[str, Any]:
    doc = document()
    item = doc["paths"][path]
    refs = doc["components"]["parameters"]
    for p in [*item.get("parameters", []), *item[method].get("parameters", [])]:
        p = refs[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
        if p["name"] == name:
            schema: dict[str, Any] = p["schema"]
            if "$ref" in schema:
                schema = schema_of(schema["$ref"].rsplit("/", 1)[1])
            return schema
    raise AssertionError(f"{method} {path} has no parameter {name}")


def body_of(path: str) -> dict[str, Any]:
    schema: dict[str, Any] = document()["paths"][path]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    return schema


def test_the_bounds_are_the_ones_the_code_enforces() -> None:
    limit = parameter("/runs", "get", "limit")
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, query.MAX_LIMIT, 50)
    offset = parameter("/products", "get", "offset")
    assert (offset["minimum"], offset["maximum"]) == (0, query.MAX_OFFSET)
    assert schema_of("Text")["maxLength"] == query.MAX_TEXT
    assert schema_of("Id")["maximum"] == query.MAX_ID
    assert schema_of("RunStatus")["enum"] == list(runs.STATUSES)
    page = parameter("/ui/state", "get", "limit")
    assert (page["maximum"], page["default"]) == (200, status.PAGE_SIZE)
    minutes = parameter("/runs/cleanup-stuck", "post", "timeout_minutes")
    assert (minutes["minimum"], minutes["maximum"], minutes["default"]) == (
        stuck.MIN_MINUTES,
        stuck.MAX_MINUTES,
        stuck.DEFAULT_MINUTES,
    )
    unprocessed = parameter("/parsing/unprocessed", "get", "limit")
    assert unprocessed["default"] == parsing.UNPROCESSED_LIMIT
    fill = body_of("/jobs/{name}/backfill")["properties"]["max"]
    assert (fill["maximum"], fill["default"]) == (backfill.HARD_MAX, backfill.DEFAULT_MAX)
    assert body_of("/jobs/{name}/pause")["properties"]["note"]["maxLength"] == control.MAX_NOTE
    days = body_of("/parsing/cleanup")["properties"]["days"]
    assert (days["maximum"], days["default"]) == (parsing.MAX_DAYS, parsing.DEFAULT_CLEANUP_DAYS)
    assert body_of("/parsing/create")["properties"]["type"]["enum"] == list(TYPES)
    assert schema_of("MetaList")["maxItems"] == parsing.MAX_LIST


def test_every_body_refuses_unknown_fields() -> None:
    for path, item in document()["paths"].items():
        post = item.get("post")
        if post is None:
            continue
        body = post.get("requestBody")
        assert body is not None, f"POST {path} documents no body"
        if "$ref" in body:
            body = document()["components"]["requestBodies"][body["$ref"].rsplit("/", 1)[1]]
        schema = body["content"]["application/json"]["schema"]
        assert schema.get("additionalProperties") is False, path


def test_every_operation_documents_the_answers_of_every_path() -> None:
    for path, item in document()["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            answers = item[method]["responses"]
            assert {"414", "431", "500"} <= set(answers), (method, path)
            schemes = {k for s in item[method].get("security", []) for k in s}
            if schemes == {"apiKey"}:  # the write key: 401 wrong, 403 unset
                assert {"401", "403"} <= set(answers), (method, path)
            elif schemes and path not in ("/", "/ui/runs/{id}"):  # the read key: 401
                assert "401" in answers, (method, path)


def test_the_keys_each_route_needs_are_the_ones_the_guards_ask() -> None:
    """POST and /parsing/*: the API key; the routes the read-key guard leaves open: none;
    every other GET: the read key or the API key, or none while no read key is set."""
    for path, item in document()["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            security = item[method].get("security", [])
            schemes = {k for s in security for k in s}
            route = "/static" if path == "/static/{filename}" else path
            if method == "post" or path.startswith("/parsing/"):
                assert security == [{"apiKey": []}], (method, path)
            elif route in OPEN_ROUTES:
                assert not schemes, (method, path)
            else:
                assert schemes == {"readKey", "apiKey"}, (method, path)
                assert {} in security, (method, path)
                assert ("401" in item[method]["responses"]) == (path not in SHELLS), path
