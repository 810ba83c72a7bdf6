"""Settings from the environment and the jobs file: defaults, and errors that name the culprit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import worker.jobs
from worker.config import JobSpec, Settings, load_jobs
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write_jobs(tmp_path: Path, toml: str) -> Path:
    path = tmp_path / "jobs.toml"
    path.write_text(toml, encoding="utf-8")
    return path


def job_toml(name: str = "sync", **fields: object) -> str:
    """One `[[jobs]]` table of kind http; `fields` are added (or override) as TOML values."""
    values: dict[str, object] = {"name": name, "kind": "http", **fields}
    lines = ["[[jobs]]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    if values["kind"] == "http":
        lines += ["[jobs.params]", 'url = "http://127.0.0.1:1/x"']
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def http_kinds() -> dict[str, Callable[[JobSpec], None]]:
    return worker.jobs.checkers(worker.jobs.kinds())


# --- the environment -------------------------------------------------------------


def test_defaults_with_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.database_url.startswith("postgresql://")
    assert settings.http_port == 8080
    assert settings.role == "all"
    assert settings.api_key is None
    assert settings.jobs_file is None
    assert settings.jobs == ()
    assert settings.worker_id
    assert settings.lease.ttl > settings.lease.deadline > settings.lease.retry_period > 0


def test_values_from_the_environment_are_used() -> None:
    settings = Settings.from_env(
        {
            "WORKER_LEASE_TTL": "15s",
            "WORKER_HTTP_PORT": "9090",
            "WORKER_ROLE": "Scheduler",
            "WORKER_ID": "pod-7",
            "WORKER_API_KEY": "s3cret-key",
            "REDIS_URL": "rediss://cache:6380/1",
            "DATABASE_URL": "postgres://db/w",
        }
    )
    assert settings.lease.ttl == 15.0
    assert settings.http_port == 9090
    assert settings.role == "scheduler"
    assert settings.worker_id == "pod-7"
    assert settings.api_key == "s3cret-key"
    assert "s3cret-key" not in repr(settings)  # the key never reaches a log line
    assert settings.redis_url == "rediss://cache:6380/1"
    assert settings.database_url == "postgres://db/w"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"WORKER_LEASE_TTL": "abc"}, ["WORKER_LEASE_TTL"]),
        ({"WORKER_HTTP_PORT": "99999"}, ["WORKER_HTTP_PORT"]),
        ({"WORKER_ROLE": "boss"}, ["WORKER_ROLE"]),
        ({"REDIS_URL": "http://x"}, ["REDIS_URL"]),
        ({"DATABASE_URL": "mysql://x"}, ["DATABASE_URL"]),
        (
            {"WORKER_LEASE_TTL": "2", "WORKER_LEASE_RENEW_DEADLINE": "3"},
            ["WORKER_LEASE_TTL", "WORKER_LEASE_RENEW_DEADLINE"],
        ),
    ],
    ids=["ttl-not-a-duration", "port-out-of-range", "role", "redis-scheme", "db-scheme", "lease"],
)
def test_a_bad_variable_is_named(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    for name in names:
        assert name in str(info.value)


def test_missing_jobs_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="WORKER_JOBS_FILE") as info:
        Settings.from_env({"WORKER_JOBS_FILE": str(missing)})
    assert str(missing) in str(info.value)


def test_jobs_file_from_the_environment_is_loaded(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, job_toml("a") + job_toml("b", manual=False))
    settings = Settings.from_env({"WORKER_JOBS_FILE": str(path)}, kinds=http_kinds())
    assert settings.jobs_file == path
    assert [j.name for j in settings.jobs] == ["a", "b"]
    b = settings.job("b")
    assert b is not None
    assert b.manual is False
    assert settings.job("c") is None


# --- the jobs file ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"90s"', 90.0), ('"15m"', 900.0), ('"2h"', 7200.0), ("30", 30.0), ("1.5", 1.5)],
)
def test_durations_parse_to_seconds(tmp_path: Path, value: str, seconds: float) -> None:
    path = write_jobs(
        tmp_path,
        f'[[jobs]]\nname = "d"\nkind = "http"\ntimeout = {value}\nmisfire_grace = {value}\n',
    )
    (job,) = load_jobs(path)
    assert job.timeout == seconds
    assert job.misfire_grace == seconds


def test_job_defaults_and_fields(tmp_path: Path) -> None:
    path = write_jobs(
        tmp_path,
        job_toml(
            "nightly",
            schedule="30 2 * * *",
            timezone="Europe/Bucharest",
            misfire="all",
            overlap="allow",
            manual=False,
        )
        + job_toml("plain"),
    )
    nightly, plain = load_jobs(path, kinds=http_kinds())
    assert nightly.schedule is not None
    assert nightly.schedule.expr == "30 2 * * *"
    assert nightly.timezone == "Europe/Bucharest"
    assert (nightly.misfire, nightly.overlap, nightly.manual) == ("all", "allow", False)
    assert nightly.params == {"url": "http://127.0.0.1:1/x"}
    assert plain.schedule is None
    assert (plain.timezone, plain.misfire, plain.overlap, plain.manual) == (
        "UTC",
        "latest",
        "forbid",
        True,
    )
    assert (plain.timeout, plain.misfire_grace) == (3600.0, 60.0)


def test_six_field_cron_has_seconds_first(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, job_toml("fast", schedule="*/10 * * * * *"))
    (job,) = load_jobs(path)
    assert job.schedule is not None
    assert job.schedule.with_seconds


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"schedule": "* * * *"}, "schedule"),
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "0 0 30 2 *"}, "schedule"),
        ({"schedule": "0 0 31 4 *"}, "schedule"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"misfire": "sometimes"}, "misfire"),
        ({"overlap": "never"}, "overlap"),
        ({"timeout": "soon"}, "timeout"),
        ({"misfire_grace": "-5s"}, "misfire_grace"),
        ({"manual": "yes"}, "manual"),
        ({"colour": "blue"}, "colour"),
    ],
    ids=[
        "cron-4-fields",
        "cron-minute-61",
        "cron-30-february",
        "cron-31-april",
        "timezone",
        "misfire",
        "overlap",
        "timeout",
        "grace",
        "manual",
        "unknown-field",
    ],
)
def test_a_bad_job_field_names_job_and_field(
    tmp_path: Path, fields: dict[str, object], field_name: str
) -> None:
    path = write_jobs(tmp_path, job_toml("ok") + job_toml("broken", **fields))
    with pytest.raises(ConfigError) as info:
        load_jobs(path)
    message = str(info.value)
    assert "'broken'" in message
    assert field_name in message
    assert str(path) in message


def test_duplicate_job_names(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, job_toml("twin") + job_toml("twin"))
    with pytest.raises(ConfigError, match=r"'twin'.*name") as info:
        load_jobs(path)
    assert "twice" in str(info.value)


def test_unknown_kind_names_job_and_known_kinds(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, job_toml("ftp-pull", kind="ftp"))
    with pytest.raises(ConfigError) as info:
        load_jobs(path, kinds=http_kinds())
    message = str(info.value)
    assert "'ftp-pull'" in message
    assert "kind" in message
    assert "'ftp'" in message
    assert "http" in message


def test_without_kinds_any_kind_is_accepted(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, job_toml("ftp-pull", kind="ftp"))
    (job,) = load_jobs(path)
    assert job.kind == "ftp"


@pytest.mark.parametrize(
    "params",
    ['url = "ftp://example.com/x"', 'url = "not a url"', "url = 5", ""],
    ids=["ftp", "no-scheme", "number", "missing"],
)
def test_http_kind_checks_its_url(tmp_path: Path, params: str) -> None:
    path = write_jobs(
        tmp_path, f'[[jobs]]\nname = "poke"\nkind = "http"\n[jobs.params]\n{params}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_jobs(path, kinds=http_kinds())
    message = str(info.value)
    assert "'poke'" in message
    assert "params" in message
    assert "url" in message


def test_job_without_a_name(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, '[[jobs]]\nkind = "http"\n')
    with pytest.raises(ConfigError, match=r"jobs\[0\].*'name'"):
        load_jobs(path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_jobs(tmp_path, "[[jobs]\nname = \n")
    with pytest.raises(ConfigError, match="WORKER_JOBS_FILE") as info:
        load_jobs(path)
    assert str(path) in str(info.value)


# --- the command line ------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only the variables a Python process needs: a WORKER_* set in the caller's shell
    # must not change what the test sees.
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_bad_config_exits_2_with_one_line() -> None:
    result = run_cli("run", env={"WORKER_LEASE_TTL": "abc"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "WORKER_LEASE_TTL" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["--help"], ["runs", "--help"]], ids=["main", "runs"])
def test_cli_help_exits_0(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: worker" in result.stdout


def test_cli_unreachable_postgres_is_named_without_the_password() -> None:
    result = run_cli("run", env={"DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/worker"})
    assert result.returncode == 1, result.stderr
    assert "cannot reach Postgres at 127.0.0.1:1/worker (DATABASE_URL)" in result.stderr
    assert "hunter2" not in result.stderr


def test_cli_unreachable_redis_is_named() -> None:
    result = run_cli("leader", env={"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
    assert result.returncode == 1, result.stderr
    assert "cannot reach Redis at 127.0.0.1:1/0 (REDIS_URL)" in result.stderr
    assert "hunter2" not in result.stderr


CLASHING = """
[[jobs]]
name = "emag-ro"
kind = "emag.offers"
[jobs.params]
account = "main"
platform = "ro"
username_env = "U"
password_env = "P"

[[jobs]]
name = "emag-bg"
kind = "emag.offers"
[jobs.params]
account = "main"
platform = "{platform}"
username_env = "U"
password_env = "P"
max_pages = 3
"""


def test_two_catalogue_jobs_on_one_account_must_read_the_same_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    registry = worker.jobs.kinds()
    path.write_text(CLASHING.format(platform="bg"))
    with pytest.raises(ConfigError, match="'emag-ro' and 'emag-bg' both write emag account 'main'"):
        load_jobs(path, kinds=worker.jobs.checkers(registry), cross_check=worker.jobs.cross_check)
    # The same catalogue read by two jobs (here with another page cap) is fine.
    path.write_text(CLASHING.format(platform="ro"))
    assert (
        len(
            load_jobs(
                path, kinds=worker.jobs.checkers(registry), cross_check=worker.jobs.cross_check
            )
        )
        == 2
    )


def test_cli_impossible_cron_exits_2_naming_job_and_field(tmp_path: Path) -> None:
    """A schedule that names no real date used to pass loading and crash every leader."""
    path = write_jobs(tmp_path, job_toml("feb30", schedule="0 0 30 2 *"))
    result = run_cli("jobs", env={"WORKER_JOBS_FILE": str(path)})
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line
    assert "'feb30'" in line
    assert "schedule" in line
    assert "never matches" in line
