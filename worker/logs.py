"""Structured logging: JSON lines off a terminal, readable text on one; and `redact()`.

Context (job, run id, token) rides in contextvars, so every line a run writes
carries them without passing a logger around. Every line goes through `redact()`,
as does every run the API, the status page and the CLI show: no secret is printed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

_context: ContextVar[dict[str, Any] | None] = ContextVar("log_context", default=None)

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


REDACTED = "[redacted]"

# A value under such a name is a credential (matched anywhere in the name, any case).
_SECRET_NAME = re.compile(r"header|token|secret|passw|key|auth|cookie|credential|signature", re.I)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_TRAILING = ".,;:!?)}"  # not "]": it ends REDACTED, and redacting twice is a no-op


def redact(value: Any, *, name: str = "") -> Any:
    """A copy of `value` fit to show: params, errors, log lines.

    Under a secret-looking name (`headers`, `*token*`, `*secret*`, `*password*`,
    `*key*`, `authorization`, …) a value is replaced by REDACTED; a table keeps its
    keys (which headers are sent), not their values. `*_env` names hold the names of
    variables, not their values, and are shown. In every string, URLs lose their
    userinfo and the values of their query and fragment.
    """
    if name.endswith("_env"):
        return value  # names of environment variables, not their values
    if _SECRET_NAME.search(name):
        if isinstance(value, Mapping):
            return dict.fromkeys(value, REDACTED)
        return REDACTED if value not in (None, "") else value
    if isinstance(value, Mapping):
        return {k: redact(v, name=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, name=name) for v in value]
    if isinstance(value, str) and "://" in value:
        return _URL.sub(_redact_url, value)
    return value


def _redact_url(match: re.Match[str]) -> str:
    # Split by hand: urlsplit refuses some netlocs (brackets, as in REDACTED@host).
    url = match.group(0)
    stripped = url.rstrip(_TRAILING)
    tail = url[len(stripped) :]
    scheme, _, rest = stripped.partition("://")
    cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    authority, rest = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    rest, hashed, fragment = rest.partition("#")
    path, asked, query = rest.partition("?")
    out = f"{scheme}://{authority}{path}"
    if asked:
        out += "?" + _redact_pairs(query)
    if hashed:
        out += "#" + _redact_pairs(fragment)
    return out + tail


def _redact_pairs(pairs: str) -> str:
    """`a=1&b` -> `a=[redacted]&[redacted]`: names stay, values (or bare values) go."""
    out = []
    for pair in pairs.split("&") if pairs else []:
        key, eq, _ = pair.partition("=")
        out.append(f"{key}={REDACTED}" if eq else (REDACTED if pair else pair))
    return "&".join(out)


def bind(**fields: Any) -> None:
    """Add fields to every log line written from the current task (and tasks it starts)."""
    _context.set({**(_context.get() or {}), **fields})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        line = f"{line}  [{extra}]" if extra else line
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context and the record's extra fields, their strings redacted.

    Only URLs are redacted here, not values by name: `token` in a log line is the
    leader's fencing token, which every line of a term should carry.
    """
    fields = {**(_context.get() or {})}
    fields.update({k: v for k, v in record.__dict__.items() if k not in _STD})
    return {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}


def setup(*, fmt: str = "auto", level: str = "INFO", worker_id: str = "") -> None:
    """Configure the root logger once, for the whole process."""
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if worker_id:
        bind(worker=worker_id)
