"""The status page: who leads, the jobs, and the runs with their progress, on one screen.

Server-rendered HTML that refreshes itself every 5 s; no JavaScript, no assets.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from .. import runs
from ..logs import redact

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2433;background:#f7f8fa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:24px 0 8px}
.sub{color:#5b6577}table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:5px 8px;border-bottom:1px solid #e6e8ec;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.s{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;color:#fff}
.succeeded{background:#2e7d32}.running{background:#1565c0}.queued{background:#6a6f7a}
.failed{background:#c62828}.abandoned{background:#ef6c00}.missed{background:#8d6e63}
.cancelled{background:#6a6f7a}.superseded{background:#8d6e63}.bar{width:120px;height:8px;background:#e6e8ec;border-radius:4px}
.bar i{display:block;height:8px;background:#1565c0;border-radius:4px}
.box{background:#fff;border:1px solid #e6e8ec;padding:10px 14px;display:inline-block}
.err{color:#c62828}code{font-size:13px}
"""


_EMPTY_JOBS = "<tr><td colspan=7>no jobs configured (WORKER_JOBS_FILE)</td></tr>"
_EMPTY_RUNS = "<tr><td colspan=8>no runs yet</td></tr>"


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = (now - when).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = f"{seconds:.0f}s"
    elif seconds < 5400:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 172800:
        text = f"{seconds / 3600:.0f}h"
    else:
        text = f"{seconds / 86400:.0f}d"
    return f"in {text}" if ahead else f"{text} ago"


def _status(status: str) -> str:
    return f'<span class="s {escape(status)}">{escape(status)}</span>'


def _progress(run: dict[str, Any]) -> str:
    p = run.get("progress") or {}
    done, total = p.get("done"), p.get("total")
    bar = ""
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        pct = min(100, round(100 * done / total))
        bar = f'<div class="bar" title="{pct}%"><i style="width:{pct}%"></i></div>'
    message = escape(redact(str(p.get("message") or "")))
    error = f'<div class="err">{escape(redact(run["error"]))}</div>' if run.get("error") else ""
    return f"{bar}{message}{error}"


def render(
    *,
    self_id: str,
    role: str,
    leader: dict[str, Any] | None,
    jobs: list[dict[str, Any]],
    recent: list[dict[str, Any]],
    now: datetime,
) -> str:
    """The page's HTML; every value from the database or config is escaped, and every
    error and progress message redacted."""
    if leader:
        lead = (
            f"<b>{escape(leader['holder'])}</b> leads (token {leader['token']},"
            f" lease {leader['ttl_ms'] / 1000:.1f}s left, since {escape(leader['since'])})"
        )
        if leader["holder"] == self_id:
            lead += " &middot; <b>this replica</b>"
    else:
        lead = '<span class="err">nobody leads right now</span>'
    job_rows = "".join(
        "<tr><td><b>{name}</b></td><td>{kind}</td><td><code>{schedule}</code> {tz}</td>"
        "<td>{next}</td><td>{last}</td><td>{when}</td><td>{progress}</td></tr>".format(
            name=escape(j["name"]),
            kind=escape(j["kind"]),
            schedule=escape(j["schedule"] or "manual"),
            tz=escape(j["timezone"]),
            next=(
                '<span class="err">paused by {}{}</span>'.format(
                    escape(str(j.get("paused_by") or "")),
                    escape(f": {redact(j['note'])}") if j.get("note") else "",
                )
                if j.get("paused")
                else '<span class="err">cannot plan: {}</span>'.format(
                    escape(str(redact(j["planning_error"])))
                )
                if j.get("planning_error")
                else _ago(j["next_slot"], now)
                if j["next_slot"]
                else "-"
            ),
            last=_status(j["last_run"]["status"]) if j["last_run"] else "never ran",
            when=_ago(j["last_run"]["created_at"], now) if j["last_run"] else "",
            progress=_progress(j["last_run"]) if j["last_run"] else "",
        )
        for j in jobs
    )
    run_rows = "".join(
        "<tr><td class=n>#{id}</td><td>{job}</td><td>{trigger}</td><td>{status}</td>"
        "<td>{slot}</td><td>{created}</td><td class=n>{took}</td><td>{progress}</td></tr>".format(
            id=r["id"],
            job=escape(r["job"]),
            trigger=escape(r["trigger"]),
            status=_status(r["status"]),
            slot=r["slot"].strftime("%Y-%m-%d %H:%M:%S") if r["slot"] else "-",
            created=_ago(r["created_at"], now),
            took=f"{runs.public(r)['duration']:.1f}s"
            if r["finished_at"] and r["started_at"]
            else "",
            progress=_progress(r),
        )
        for r in recent
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>sync worker</title><style>{_STYLE}</style></head>
<body><h1>sync worker</h1>
<div class="sub">replica <b>{escape(self_id)}</b> (role {escape(role)}) &middot;
{now:%Y-%m-%d %H:%M:%S} UTC &middot; <a href="/metrics">metrics</a> &middot;
<a href="/runs">runs JSON</a> &middot; <a href="/jobs">jobs JSON</a></div>
<h2>Leader</h2><div class="box">{lead}</div>
<h2>Jobs</h2><table><tr><th>job</th><th>kind</th><th>schedule</th><th>next slot</th>
<th>last run</th><th></th><th>progress</th></tr>{job_rows or _EMPTY_JOBS}</table>
<h2>Recent runs</h2><table><tr><th>run</th><th>job</th><th>trigger</th><th>status</th>
<th>slot</th><th>created</th><th>took</th><th>progress</th></tr>{run_rows or _EMPTY_RUNS}</table>
</body></html>"""
