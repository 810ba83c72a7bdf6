"""The API's OpenAPI document (`openapi.yaml` beside this module), served as
`GET /openapi.json`.

The file describes every route of every role; each replica serves it reduced to the
paths its router has (a `WORKER_ROLE=scheduler` replica: the probes, `/metrics` and
this one), with the installed package's version. It is read and reduced once, when
the application is built.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from ..robots import version

DOCUMENT = Path(__file__).parent / "openapi.yaml"
PATH = "/openapi.json"
SERVED = web.AppKey("openapi_document", bytes)
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAMETER = re.compile(r"\{([^{}]+)\}")


@functools.cache
def document() -> dict[str, Any]:
    """The whole document, as written (parsed once per process)."""
    with DOCUMENT.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


def routes(app: web.Application) -> dict[str, set[str]]:
    """The application's routes as the document writes them: path template (the static
    directory as `/static/{filename}`) -> lower-case methods, without the HEAD aiohttp
    adds to every GET."""
    found: dict[str, set[str]] = {}
    for resource in app.router.resources():
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path = path.rstrip("/") + "/{filename}"
        for route in resource:
            method = route.method.lower()
            if method != "head":
                found.setdefault(path, set()).add(method)
    return found


def path_parameters(path: str) -> list[str]:
    """The names in a path template, in order: `/runs/{id}/cancel` -> ["id"]."""
    return _PARAMETER.findall(path)


def reduced(served: dict[str, set[str]]) -> dict[str, Any]:
    """The document with only the operations of `served` (path -> methods)."""
    doc = copy.deepcopy(document())
    paths = {}
    for path, item in doc["paths"].items():
        methods = served.get(path, set())
        kept = {k: v for k, v in item.items() if k not in HTTP_METHODS or k in methods}
        if any(k in HTTP_METHODS for k in kept):
            paths[path] = kept
    doc["paths"] = paths
    doc["info"]["version"] = version()
    return doc


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SERVED], content_type="application/json")


def add_route(app: web.Application) -> None:
    """Serve the document at `GET /openapi.json`, reduced to the routes `app` has now:
    call it once every other route is added."""
    app.router.add_get(PATH, serve)
    app[SERVED] = orjson.dumps(reduced(routes(app)))
