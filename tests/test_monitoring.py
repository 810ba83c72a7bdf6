"""Monitoring files (k8s/monitoring/) and the metrics they read.

The alert rules are checked and unit-tested by promtool itself; the dashboard's
queries are parsed by promtool too (as recording rules); every metric the dashboard
and the rules name must be one a running worker's /metrics declares; the per-job
gauges are fed from a real Postgres.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from redis.asyncio import Redis

from worker import db, executor, jobgauges, metrics, pauses
from worker.config import JobSpec
from worker.context import RunContext
from worker.schedule import CronSchedule
from worker.scheduler import Leader
from worker.upstream import Upstream

from .helpers import eventually, grant_for, leading, settings_with_jobs
from .test_api import Client, client, make_client, settings
from .test_leader_faults import upstream

__all__ = ["client", "make_client", "settings", "upstream"]  # fixtures, for pytest

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "alerts.rules.yaml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "alerts.test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: scripts/ensure-tools installs it (Debian's prometheus)",
)
# What the dashboard must show (issue 11): one metric of each topic at least.
DASHBOARD_TOPICS = {
    "worker_leader",
    "worker_leader_transitions_total",
    "worker_runs_total",
    "worker_run_duration_seconds_bucket",
    "worker_items_synced_total",
    "worker_upstream_requests_total",
    "worker_rate_limit_wait_seconds_bucket",
    "worker_missed_slots_total",
    "worker_skipped_slots_total",
    "worker_stuck_runs_detected_total",
    "worker_webhook_deliveries_total",
    "worker_config_reloads_total",
}
# Grafana's variables, replaced by something PromQL parses.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${namespace}": ".*",
    "$namespace": ".*",
    "${job}": ".*",
    "$job": ".*",
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


# --- reading PromQL -----------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or
    keywords). promtool parses the expressions; this only has to find the names."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for found in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", text):
        rest = text[found.end() :].lstrip()
        if rest.startswith("(") or found.group().lower() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(found.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(a_bucket{job=~"x|y", code="429"}[5m])))'
        " / on (job) group_left (host) b_total offset 15m > bool 1.5e3"
        ' unless max without (by) (c{by="failures"}[1h:15s]) or time() - d'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def exported_names(text: str) -> set[str]:
    """The series names an exposition declares: each family's `# TYPE` name (printed
    even for a labelled metric with no samples yet), a histogram's _bucket/_sum/_count,
    and every sample's name. `_created` (when the client exports it: some sample has
    one) goes with every counter and histogram."""
    names: set[str] = set()
    with_created: set[str] = set()  # counter and histogram families
    created = False
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_sum", f"{name}_count"}
                with_created.add(name)
            if kind == "histogram":
                names.add(f"{name}_bucket")
            if kind == "counter":
                with_created.add(name.removesuffix("_total"))
        elif line and not line.startswith("#"):
            sample = re.match(r"[A-Za-z_:][\w:]*", line)
            assert sample, line
            names.add(sample.group())
            created = created or sample.group().endswith("_created")
    if created:
        names |= {f"{name}_created" for name in with_created}
    return names


def _rule_exprs() -> dict[str, str]:
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in _yaml(RULES)["groups"]
        for rule in group["rules"]
    }


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def _dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard (panels, annotations), Grafana variables replaced."""
    board = _dashboard()
    found = {
        f"panel {p['id']} {p['title']!r} {t['refId']}": t["expr"]
        for p in _panels(board["panels"])
        for t in p.get("targets", [])
    }
    for a in board["annotations"]["list"]:
        if "expr" in a:
            found[f"annotation {a['name']!r}"] = a["expr"]
    out = {}
    for where, expr in found.items():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable the test does not know: {expr}"
        out[where] = expr
    return out


# --- alert rules ----------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = _promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for g in _yaml(RULES)["groups"] for rule in g["rules"]}
    assert alerts
    cases = [case for test in _yaml(RULE_TESTS)["tests"] for case in test["alert_rule_test"]]
    for alert in alerts:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} is never shown silent"


def test_alerts_have_severity_summary_and_runbook() -> None:
    docs = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8").lower()
    for group in _yaml(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            runbook = rule["annotations"]["runbook"]
            assert runbook == f"docs/monitoring.md#{rule['alert'].lower()}"
            assert f"### {rule['alert'].lower()}" in docs, f"docs/monitoring.md: {runbook}"


def test_prometheusrule_holds_the_same_groups_as_the_rule_file() -> None:
    manifest = _yaml(MONITORING / "prometheusrule.yaml")
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "sync-worker"
    assert manifest["spec"]["groups"] == _yaml(RULES)["groups"]


# --- ServiceMonitor and the kustomization -----------------------------------------------


def test_servicemonitor_scrapes_the_worker_service() -> None:
    monitor = _yaml(MONITORING / "servicemonitor.yaml")
    service = _yaml(ROOT / "k8s" / "service.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    )
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"
    # The per-job metrics' `job` label must not become `exported_job`.
    assert endpoint["honorLabels"] is True


def test_monitoring_kustomization_lists_its_files() -> None:
    kustomization = _yaml(MONITORING / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (MONITORING / resource).is_file(), resource
    (generator,) = kustomization["configMapGenerator"]
    (source,) = generator["files"]
    assert (MONITORING / source.split("=", 1)[1]).resolve() == DASHBOARD
    # The base kustomization leaves monitoring out: it needs the operator's CRDs.
    base = _yaml(ROOT / "k8s" / "kustomization.yaml")
    assert not [r for r in base["resources"] if "monitoring" in r]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_monitoring_kustomization_renders() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
    assert set(docs) == {"ConfigMap", "ServiceMonitor", "PrometheusRule"}
    configmap = docs["ConfigMap"]
    # The core object is validated like the base manifests; the two CRDs have no
    # schema here (tests above check their contents).
    kubernetes_validate.validate(configmap, kubernetes_validate.latest_version(), strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["sync-worker.json"]) == _dashboard()


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_is_valid_and_laid_out() -> None:
    board = _dashboard()
    assert board["uid"]
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = list(_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"{p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        for target in p["targets"]:
            assert target["expr"].strip(), p["title"]
            assert target["datasource"]["uid"] == "${datasource}"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no dashboard check: each query becomes a recording rule it parses."""
    exprs = _dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, expr in enumerate(exprs.values())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_dashboard_shows_every_topic_and_every_worker_metric() -> None:
    used = {name for expr in _dashboard_exprs().values() for name in metric_names(expr)}
    for where, expr in _dashboard_exprs().items():
        assert metric_names(expr), f"{where} selects no metric: {expr}"
    assert used >= DASHBOARD_TOPICS, DASHBOARD_TOPICS - used
    # Every family of worker/metrics.py, so a metric added there is not forgotten here.
    families = {
        family.name
        for value in vars(metrics).values()
        if isinstance(value, Counter | Gauge | Histogram)
        for family in value.collect()
    }
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    missing = {f for f in families if f.startswith("worker_") and f not in bases}
    assert not missing, f"worker metrics the dashboard does not show: {sorted(missing)}"


async def test_dashboard_and_rules_name_only_metrics_the_worker_exports(client: Client) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    exported = exported_names(await response.text())
    assert "worker_job_paused" in exported  # labelled, no samples: declared all the same
    named = {
        **{f"rule {k}": metric_names(v) for k, v in _rule_exprs().items()},
        **{k: metric_names(v) for k, v in _dashboard_exprs().items()},
    }
    unknown = {where: names - exported for where, names in named.items() if names - exported}
    assert not unknown, f"metrics no worker exports: {unknown}"


# --- the per-job gauges ------------------------------------------------------------------


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _spec(name: str, schedule: str | None, tz: str = "UTC") -> JobSpec:
    return JobSpec(
        name=name,
        kind="http",
        schedule=CronSchedule(schedule, tz) if schedule else None,
        timezone=tz,
    )


async def _run(pool: db.Pool, job: str, status: str, finished: datetime) -> None:
    await pool.execute(
        "INSERT INTO runs (job, kind, trigger, status, started_at, finished_at)"
        " VALUES ($1, 'http', 'manual', $2, $3, $3)",
        job,
        status,
        finished,
    )


@pytest.fixture
def gauges() -> Iterator[None]:
    jobgauges.clear()
    yield
    jobgauges.clear()


async def test_refresh_sets_the_job_gauges_from_postgres(pool: db.Pool, gauges: None) -> None:
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # a Monday: the weekend is 5 slots ahead
    specs = [
        _spec("alpha", "*/5 * * * *"),
        _spec("beta", "0 3 * * 1-5", "Europe/Bucharest"),  # weekdays: a 3-day weekend gap
        _spec("gamma", None),  # manual only
    ]
    hour = timedelta(hours=1)
    await _run(pool, "alpha", "succeeded", now - 2 * hour)
    await _run(pool, "alpha", "succeeded", now - hour)  # the newest success
    await _run(pool, "alpha", "failed", now - hour / 2)  # newer, but not a success
    await _run(pool, "beta", "succeeded", now - 3 * hour)
    await _run(pool, "other", "succeeded", now)  # not in the jobs file
    await db.raise_fence(pool, token=1, holder="t")
    async with db.fenced(pool, 1) as conn:
        for _ in range(3):  # alpha: paused by the leader at the third failure
            await pauses.record_outcome(conn, "alpha", status="failed", error="x", pause_after=3)
        await pauses.record_outcome(conn, "beta", status="failed", error="x", pause_after=None)
    await pauses.pause(pool, "beta", by="cli", note="upstream maintenance")
    # Left by an earlier refresh for a job since removed from the jobs file.
    await jobgauges.refresh(pool, [*specs, _spec("removed", "*/5 * * * *")], now)
    assert _value("worker_job_failure_streak", job="removed") == 0

    await jobgauges.refresh(pool, specs, now)

    streak = "worker_job_failure_streak"
    assert [_value(streak, job=j) for j in ("alpha", "beta", "gamma", "removed")] == [
        3,
        1,
        0,
        None,
    ]
    paused = "worker_job_paused"
    assert {
        (j, by): _value(paused, job=j, by=by)
        for j in ("alpha", "beta", "gamma", "removed")
        for by in ("failures", "operator")
    } == {
        ("alpha", "failures"): 1,
        ("alpha", "operator"): 0,
        ("beta", "failures"): 0,
        ("beta", "operator"): 1,
        ("gamma", "failures"): 0,
        ("gamma", "operator"): 0,
        ("removed", "failures"): None,
        ("removed", "operator"): None,
    }
    success = "worker_job_last_success_timestamp_seconds"
    assert _value(success, job="alpha") == (now - hour).timestamp()
    assert _value(success, job="beta") == (now - 3 * hour).timestamp()
    assert _value(success, job="gamma") is None
    assert _value(success, job="other") is None
    period = "worker_job_expected_period_seconds"
    assert _value(period, job="alpha") == 300
    assert _value(period, job="beta") == 3 * 86400  # Friday 03:00 to Monday 03:00
    assert _value(period, job="gamma") is None

    # Resumed, then a success: no streak, no pause, a newer last success.
    await pauses.resume(pool, "alpha")
    await _run(pool, "alpha", "succeeded", now)
    await jobgauges.refresh(pool, specs, now)
    assert _value(streak, job="alpha") == 0
    assert _value(paused, job="alpha", by="failures") == 0
    assert _value(paused, job="alpha", by="operator") == 0
    assert _value(success, job="alpha") == now.timestamp()

    # The jobs file lost beta: its label sets go.
    await jobgauges.refresh(pool, specs[::2], now)
    assert _value(streak, job="beta") is None
    assert _value(paused, job="beta", by="operator") is None
    assert _value(success, job="beta") is None
    assert _value(period, job="beta") is None

    jobgauges.clear()  # the term ended: a follower exports none of them
    for name in (streak, success, period):
        assert _value(name, job="alpha") is None
    assert _value(paused, job="alpha", by="operator") is None


def test_expected_period_spans_the_gap_the_schedule_is_in() -> None:
    """A per-second job in business hours: on a Saturday the gap is the weekend, not 1 s
    (the alert would fire all weekend), and on a Wednesday noon it is 1 s."""
    business = CronSchedule("* * 9-17 * * 1-5", "Europe/Bucharest")
    saturday = datetime(2026, 6, 6, 9, 0, tzinfo=UTC)
    # Friday 17:59:59 to Monday 09:00:00 local time.
    assert jobgauges.expected_period(business, saturday) == 63 * 3600 + 1
    wednesday = datetime(2026, 6, 3, 9, 0, tzinfo=UTC)
    assert jobgauges.expected_period(business, wednesday) == 1
    # One slot in five years, none in the year before: no gap to measure.
    leap_day = CronSchedule("0 0 29 2 *")
    assert jobgauges.expected_period(leap_day, datetime(2029, 3, 1, tzinfo=UTC)) is None


# --- items synced ------------------------------------------------------------------------

ITEMS_JOBS = """
[[jobs]]
name = "{name}"
kind = "returns"
schedule = "* * * * * *"
overlap = "allow"
misfire = "skip"
[jobs.params]
{params}
"""


class Returns:
    """A job kind that returns `params.result`, or fails when `params.fail`."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        if ctx.params.get("fail"):
            raise RuntimeError("asked to fail")
        return dict(ctx.params["result"])


async def test_items_synced_counts_what_succeeded_runs_wrote(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    jobs = {
        "isync-catalog": "result = { items = 7, created = 2, pages = 1 }",
        "isync-parse": "result = { events = 3, failed = 1 }",
        "isync-http": "result = { status = 200, bytes = 10 }",
        "isync-failing": "fail = true\nresult = { items = 5 }",
    }
    toml = "".join(ITEMS_JOBS.format(name=n, params=p) for n, p in jobs.items())
    settings = settings_with_jobs(tmp_path, toml, database_url=database_url)
    before = {n: _value("worker_items_synced_total", job=n) or 0 for n in jobs}
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"returns": Returns()})

    async def ended(status: str, job: str) -> int:
        count: int = await pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = $1 AND status = $2", job, status
        )
        return count

    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        for name in jobs:
            status = "failed" if name == "isync-failing" else "succeeded"
            await eventually(functools.partial(ended, status, name), timeout=10)
    after = {n: _value("worker_items_synced_total", job=n) or 0 for n in jobs}
    assert after["isync-catalog"] - before["isync-catalog"] == 7 * await ended(
        "succeeded", "isync-catalog"
    )
    assert after["isync-parse"] - before["isync-parse"] == 3 * await ended(
        "succeeded", "isync-parse"
    )
    assert after["isync-http"] == before["isync-http"] == 0
    assert after["isync-failing"] == before["isync-failing"] == 0


async def test_items_synced_counts_once_when_the_end_commit_is_retried(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's end is recorded, counted, then its transaction fails (a lost connection,
    say) and is retried: the counter moves once, by what the one run wrote."""
    toml = ITEMS_JOBS.format(name="isync-retried", params="result = { items = 7 }")
    settings = settings_with_jobs(tmp_path, toml, database_url=database_url)
    before = _value("worker_items_synced_total", job="isync-retried") or 0
    counted = executor.Executor._count_outcome
    calls = 0

    async def count_then_lose_the_commit(self: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        after_commit = await counted(self, *args)
        if calls == 1:
            raise TimeoutError("the end's commit was lost")  # transient: retried
        return after_commit

    monkeypatch.setattr(executor.Executor, "_count_outcome", count_then_lose_the_commit)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"returns": Returns()})

    async def succeeded() -> int:
        count: int = await pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = 'isync-retried' AND status = 'succeeded'"
        )
        return count

    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(succeeded, timeout=10)
    assert calls >= 2  # the end was recorded twice: once rolled back, once committed
    after = _value("worker_items_synced_total", job="isync-retried") or 0
    assert after - before == 7 * await succeeded()
