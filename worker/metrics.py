"""Prometheus metrics. Registered once on the default registry (with the process collector)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEADER = Gauge("worker_leader", "1 while this replica leads, else 0")
LEADER_TOKEN = Gauge(
    "worker_leader_token", "Fencing token of this replica's current term (0 if none)"
)
LEADER_TRANSITIONS = Counter(
    "worker_leader_transitions_total", "Times this replica gained or lost leadership"
)
LEASE_RENEW_FAILURES = Counter(
    "worker_lease_renew_failures_total", "Lease renewals that failed or found the lease gone"
)
RUNS = Counter("worker_runs_total", "Runs finished, by job and final status", ["job", "status"])
RUN_DURATION = Histogram(
    "worker_run_duration_seconds",
    "Wall time of finished runs",
    ["job"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
)
MISSED_SLOTS = Counter("worker_missed_slots_total", "Slots recorded as missed", ["job"])
SKIPPED_SLOTS = Counter(
    "worker_skipped_slots_total",
    "Slots not run because a run of the job was going (overlap skip or buffer_one)",
    ["job"],
)
PLANNING_ERRORS = Counter(
    "worker_planning_errors_total", "Ticks at which a job's slots could not be planned", ["job"]
)
RUNS_GIVEN_UP = Counter(
    "worker_runs_given_up_total",
    "Resumable runs given up for good after their last failed attempt",
    ["job"],
)
GONE_GUARD_TRIPS = Counter(
    "worker_gone_guard_trips_total",
    "Complete passes that listed too few items to mark anything gone",
    ["job"],
)
JOBS_AUTO_PAUSED = Counter(
    "worker_jobs_auto_paused_total",
    "Jobs the leader paused after pause_after_failures failed runs in a row",
    ["job"],
)
RUNS_SUPERSEDED = Counter(
    "worker_runs_superseded_total",
    "Resumes dropped because a newer complete pass of the job finished first",
    ["job"],
)
RUNS_ACTIVE = Gauge("worker_runs_active", "Runs executing in this replica")
UPSTREAM_REQUESTS = Counter(
    "worker_upstream_requests_total",
    "Upstream HTTP attempts by host and status code (or error class)",
    ["host", "code"],
)
UPSTREAM_DURATION = Histogram(
    "worker_upstream_request_duration_seconds", "Upstream HTTP attempt latency", ["host"]
)
RATE_LIMIT_WAIT = Histogram(
    "worker_rate_limit_wait_seconds",
    "Time spent waiting for a rate-limit permit",
    ["key"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
RATE_LIMIT_REDIS_ERRORS = Counter(
    "worker_rate_limit_redis_errors_total",
    "Rate-limit window calls to Redis that failed or timed out (the local window held alone)",
)
UPSTREAM_RETRIES = Counter(
    "worker_upstream_retries_total",
    "Upstream attempts retried, by host and reason (HTTP status, timeout or error)",
    ["host", "reason"],
)
ITEMS_SYNCED = Counter(
    "worker_items_synced_total",
    "Items a finished run wrote (products, offers or events), by job",
    ["job"],
)
STUCK_RUNS_DETECTED = Counter(
    "worker_stuck_runs_detected_total",
    "Runs found running with a stale heartbeat beyond the stuck threshold",
)
STUCK_RUNS_RECOVERED = Counter(
    "worker_stuck_runs_recovered_total",
    "Stuck runs ended (failed, or abandoned and resumed), by the leader or by cleanup-stuck",
)
WEBHOOK_DELIVERIES = Counter(
    "worker_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered, failed, given_up)",
    ["outcome"],
)
WEBHOOK_PENDING = Gauge(
    "worker_webhook_outbox_pending", "Webhook deliveries waiting in the outbox (leader only)"
)
CONFIG_RELOADS = Counter(
    "worker_config_reloads_total",
    "Jobs-file reloads by outcome (applied, unchanged, refused)",
    ["outcome"],
)
JOB_FAILURE_STREAK = Gauge(
    "worker_job_failure_streak", "Failed runs of the job in a row (leader only)", ["job"]
)
JOB_PAUSED = Gauge(
    "worker_job_paused",
    "1 while the job is paused, by who paused it: operator or failures (leader only)",
    ["job", "by"],
)
JOB_LAST_SUCCESS = Gauge(
    "worker_job_last_success_timestamp_seconds",
    "When the job's newest succeeded run finished (leader only)",
    ["job"],
)
JOB_EXPECTED_PERIOD = Gauge(
    "worker_job_expected_period_seconds",
    "The longest gap between two slots of the job's schedule (leader only)",
    ["job"],
)
EVENT_LOOP_LAG = Histogram(
    "worker_event_loop_lag_seconds",
    "How late the event loop ran a timer (sampled every 0.1 s): the wait a probe or any"
    " other callback had behind CPU-bound work",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
