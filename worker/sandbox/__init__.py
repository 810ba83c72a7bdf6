"""A local sandbox marketplace speaking the eMAG and eBay API shapes (see docs/sandbox.md)."""

from .app import SandboxConfig, build_app, main, max_in_window, serve
from .catalog import QUERY_TERMS, Catalog
from .state import REQUESTS, SANDBOX, Faults, RequestRecord, Sandbox

__all__ = [
    "QUERY_TERMS",
    "REQUESTS",
    "SANDBOX",
    "Catalog",
    "Faults",
    "RequestRecord",
    "Sandbox",
    "SandboxConfig",
    "build_app",
    "main",
    "max_in_window",
    "serve",
]
