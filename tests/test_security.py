"""Who may do what over HTTP: the write key, the optional read key (WORKER_READ_KEY) and
the routes that stay open; keys compared in constant time and never logged or put in a
URL; and every secret readable from a file (`<NAME>_FILE`). Against real Postgres and
Redis; the status page's key prompt in a real browser (headless Chromium) too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from worker import db, logs, runs
from worker.config import MAX_SECRET_FILE, SECRETS, Settings, load_jobs, secret
from worker.errors import ConfigError, JobError
from worker.jobs import marketplaces, remote_parsing
from worker.web.app import key_matches

from .test_api import MakeClient as ApiMakeClient
from .test_api import assert_error, settings
from .test_api import make_client as api_make_client
from .test_config import run_cli

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
__all__ = ["api_make_client", "settings"]  # fixtures, imported for pytest

WRITE_KEY = "write-k3y-0123456789"
READ_KEY = "read-k3y-9876543210"
# Every GET that shows data; {id} is a run's id.
READS = [
    "/leader",
    "/jobs",
    "/jobs/poke",
    "/runs",
    "/runs/{id}",
    "/webhooks",
    "/products",
    "/events",
    "/replicas",
    "/ui/state",
    "/ui/jobs/poke/chart",
]
OPEN = ["/healthz", "/readyz", "/metrics", "/openapi.json"]


@pytest.fixture
async def make_client(api_make_client: ApiMakeClient) -> MakeClient:
    """The app over real stores, with the write key and, unless told, the read key."""

    async def make(**overrides: Any) -> Client:
        client, _ = await api_make_client(
            **{
                "api_key": WRITE_KEY,
                "read_key": READ_KEY,
                "jobs_file": None,
                "worker_id": "guarded-replica",
                **overrides,
            }
        )
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


@pytest.fixture
async def run_id(pool: db.Pool) -> int:
    found: int = await runs.enqueue(pool, job="poke", kind="http", params={})
    return found


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


# --- comparing keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected", "same"),
    [
        ("k3y", "k3y", True),
        ("k3y", "k3y ", False),
        ("", "k3y", False),
        ("k3y" * 100, "k3y", False),
        ("ключ", "ключ", True),
        ("\udcff", "k3y", False),  # an undecodable header byte, as aiohttp hands it over
    ],
)
def test_keys_are_compared_whole(given: str, expected: str, same: bool) -> None:
    assert key_matches(given, expected) is same


async def test_an_odd_key_is_refused_not_an_error(client: Client) -> None:
    for value in ("ключ", "x" * 4000):
        response = await client.post("/jobs/poke/trigger", headers=key(value))
        await assert_error(response, 401, "unauthorized")


# --- the read key ----------------------------------------------------------------------


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize(
    "headers",
    [{}, key("wrong"), key(""), key(READ_KEY + "x")],
    ids=["none", "wrong", "empty", "longer"],
)
async def test_reads_need_a_key(
    client: Client, run_id: int, path: str, headers: dict[str, str]
) -> None:
    response = await client.get(path.format(id=run_id), headers=headers)
    message = await assert_error(response, 401, "unauthorized")
    assert "WORKER_READ_KEY" in message
    assert "wrong" not in message  # the key given is never echoed


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize("value", [READ_KEY, WRITE_KEY], ids=["read-key", "write-key"])
async def test_the_read_key_and_the_write_key_both_read(
    client: Client, run_id: int, path: str, value: str
) -> None:
    response = await client.get(path.format(id=run_id), headers=key(value))
    assert response.status == 200, await response.text()
    # What a key unlocked is not kept by a cache for a request without one.
    assert response.headers["Cache-Control"] == "no-store"
    assert "X-API-Key" in response.headers["Vary"]


async def test_head_is_a_read_too(client: Client) -> None:
    assert (await client.head("/jobs")).status == 401
    assert (await client.head("/jobs", headers=key(READ_KEY))).status == 200


@pytest.mark.parametrize("path", READS)
async def test_without_a_read_key_reads_are_open(
    make_client: MakeClient, run_id: int, path: str
) -> None:
    client = await make_client(read_key=None)
    response = await client.get(path.format(id=run_id))
    assert response.status == 200, await response.text()
    assert "no-store" not in response.headers.get("Cache-Control", "")


@pytest.mark.parametrize("path", OPEN)
async def test_probes_and_metrics_need_no_key(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status in (200, 503), await response.text()  # readyz: 503 is fine
    assert "no-store" not in response.headers.get("Cache-Control", "")


async def test_an_unknown_path_is_401_before_404(client: Client) -> None:
    """Without a key the route table is not shown either."""
    await assert_error(await client.get("/no/such/thing"), 401, "unauthorized")
    await assert_error(await client.get("/no/such/thing", headers=key(READ_KEY)), 404)


async def test_the_read_key_does_not_write(client: Client, pool: db.Pool) -> None:
    for path in ("/jobs/poke/trigger", "/jobs/poke/pause", "/admin/reload"):
        await assert_error(await client.post(path, headers=key(READ_KEY)), 401, "unauthorized")
    # GET /parsing/results marks an operation processed: it takes the write key.
    response = await client.get("/parsing/unprocessed", headers=key(READ_KEY))
    await assert_error(response, 401, "unauthorized")
    assert await runs.search(pool) == []
    response = await client.post("/jobs/poke/trigger", headers=key(WRITE_KEY))
    assert response.status == 202


def test_a_read_key_equal_to_the_write_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="WORKER_READ_KEY") as caught:
        Settings.from_env({"WORKER_API_KEY": "same-key", "WORKER_READ_KEY": "same-key"})
    assert "same-key" not in str(caught.value)


# --- the status page with a read key ---------------------------------------------------


async def test_the_page_loads_as_a_shell_without_data(client: Client, run_id: int) -> None:
    for path in ("/", f"/ui/runs/{run_id}"):
        response = await client.get(path)
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
        assert "data-locked" in page
        assert "WORKER_READ_KEY" in page
        # No data: not the replica, not a job, not the run.
        for shown in ("guarded-replica", "poke", 'id="run"', 'id="leader"'):
            assert shown not in page, shown
        # ...but the script that asks for the key, and the dialog it asks with.
        assert "common.js" in page
        assert 'id="key-dialog"' in page
        assert 'id="key-unlock"' in page


async def test_with_a_key_the_page_has_its_data(client: Client, run_id: int) -> None:
    page = await (await client.get("/", headers=key(READ_KEY))).text()
    assert "data-locked" not in page
    assert "guarded-replica" in page
    assert 'data-job="poke"' in page
    run = await (await client.get(f"/ui/runs/{run_id}", headers=key(WRITE_KEY))).text()
    assert f'data-run="{run_id}"' in run


async def test_static_files_need_no_key(client: Client) -> None:
    for name in ("common.js", "index.js", "run.js", "status.css", "favicon.svg"):
        response = await client.get(f"/static/{name}")
        assert response.status == 200, name


def test_the_script_sends_the_key_in_a_header_only() -> None:
    """The key is read in one place and sent as the X-API-Key header; it never goes
    into a URL, a cookie or localStorage (which outlives the tab)."""
    static = Path(__file__).resolve().parent.parent / "worker" / "web" / "static"
    scripts = {p.name: p.read_text(encoding="utf-8") for p in static.glob("*.js")}
    common = scripts.pop("common.js")
    assert 'ui.headers = () => (ui.key() ? { "X-API-Key": ui.key() } : {});' in common
    for name, text in {**scripts, "common.js": common}.items():
        assert "localStorage" not in text.replace("sessionStorage", ""), name
        assert "document.cookie" not in text, name
        assert "searchParams.set(KEY" not in text, name
        assert "?key=" not in text, name
        assert "&key=" not in text, name


# --- keys never logged -----------------------------------------------------------------


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """`logs.setup` at DEBUG for the test (writing to the captured stderr), undone after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access").level
    logs.setup(fmt="json", level="DEBUG")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access)


@pytest.mark.usefixtures("json_logs")
async def test_no_key_reaches_a_log_line(
    client: Client, run_id: int, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "guess-0f-a-k3y"
    for value in (READ_KEY, WRITE_KEY, wrong):
        await client.get("/jobs", headers=key(value))
        await client.get("/no/such/thing", headers=key(value))
        await client.post("/jobs/poke/trigger", headers=key(value))
        await client.post(f"/runs/{run_id}/cancel", headers=key(value))
        await client.post("/jobs/poke/backfill", headers=key(value), data=b"{not json")
    err = capsys.readouterr().err
    assert "queued via the API" in err  # the log was captured
    for value in (READ_KEY, WRITE_KEY, wrong):
        assert value not in err


def test_no_key_is_in_the_settings_repr() -> None:
    settings = Settings(
        api_key=WRITE_KEY,
        read_key=READ_KEY,
        webhook_secret="hook-s3cret",
        database_url="postgresql://w:db-s3cret@db/w",
        redis_url="redis://:redis-s3cret@cache:6379/0",
    )
    shown = repr(settings)
    for value in (WRITE_KEY, READ_KEY, "hook-s3cret", "db-s3cret", "redis-s3cret"):
        assert value not in shown


# --- secrets from files ----------------------------------------------------------------

VALUES = {
    "WORKER_API_KEY": "api-from-file",
    "WORKER_READ_KEY": "read-from-file",
    "WORKER_WEBHOOK_SECRET": "hook-from-file",
    "DATABASE_URL": "postgresql://w:pw@db:5432/w",
    "REDIS_URL": "rediss://:pw@cache:6380/1",
}
FIELDS = {
    "WORKER_API_KEY": "api_key",
    "WORKER_READ_KEY": "read_key",
    "WORKER_WEBHOOK_SECRET": "webhook_secret",
    "DATABASE_URL": "database_url",
    "REDIS_URL": "redis_url",
}


def test_every_secret_is_listed() -> None:
    assert set(SECRETS) == set(VALUES) == set(FIELDS)


@pytest.mark.parametrize("name", SECRETS)
def test_each_secret_reads_from_its_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name.lower()
    path.write_text(VALUES[name] + "\n", encoding="utf-8")  # as `echo` writes it
    settings = Settings.from_env({f"{name}_FILE": str(path)})
    assert getattr(settings, FIELDS[name]) == VALUES[name]


@pytest.mark.parametrize("name", SECRETS)
def test_a_variable_and_its_file_together_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "s"
    path.write_text(VALUES[name], encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: VALUES[name], f"{name}_FILE": str(path)})
    message = str(caught.value)
    assert name in message
    assert f"{name}_FILE" in message
    assert VALUES[name] not in message


@pytest.mark.parametrize(
    ("content", "value"),
    [
        ("k3y", "k3y"),
        ("k3y\n", "k3y"),
        ("k3y\r\n", "k3y"),
        ("k3y\n\n", "k3y\n"),  # one newline only: the rest is the file's
        (" k3y \n", " k3y "),
    ],
    ids=["bare", "newline", "crlf", "two-newlines", "spaces-kept"],
)
def test_one_trailing_newline_is_stripped(tmp_path: Path, content: str, value: str) -> None:
    path = tmp_path / "s"
    path.write_bytes(content.encode())
    assert secret("K", {"K_FILE": str(path)}) == value


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("k3y", encoding="utf-8")
    assert secret("K", {"K": "", "K_FILE": str(path)}) == "k3y"
    assert secret("K", {"K": " v ", "K_FILE": ""}) == "v"
    assert secret("K", {}) is None


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "Is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\n"), "is empty"),
        (lambda p: p.write_bytes(b"\xff\xfeleaked-s3cret"), "not UTF-8"),
        (lambda p: p.write_bytes(b"leaked-s3cret" * (MAX_SECRET_FILE // 10)), "larger than"),
    ],
    ids=["missing", "directory", "empty", "only-newline", "not-utf8", "too-large"],
)
def test_an_unreadable_file_names_the_variable_and_path(
    tmp_path: Path, make: Callable[[Path], object], why: str
) -> None:
    path = tmp_path / "secret"
    make(path)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WORKER_API_KEY_FILE": str(path)})
    message = str(caught.value)
    assert message.startswith("WORKER_API_KEY_FILE: ")
    assert str(path) in message
    assert why in message
    assert "leaked-s3cret" not in message


def test_a_bad_url_in_a_file_is_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.write_text("hunter2-not-a-url\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="DATABASE_URL_FILE") as caught:
        Settings.from_env({"DATABASE_URL_FILE": str(path)})
    assert "hunter2" not in str(caught.value)
    path.write_text("mysql://u:hunter2@db/w", encoding="utf-8")
    with pytest.raises(ConfigError, match="'mysql'://") as caught:
        Settings.from_env({"DATABASE_URL_FILE": str(path)})
    assert "hunter2" not in str(caught.value)


def test_a_read_key_from_a_file_guards_the_reads(tmp_path: Path) -> None:
    path = tmp_path / "read"
    path.write_text(READ_KEY + "\n", encoding="utf-8")
    settings = Settings.from_env({"WORKER_API_KEY": WRITE_KEY, "WORKER_READ_KEY_FILE": str(path)})
    assert (settings.api_key, settings.read_key) == (WRITE_KEY, READ_KEY)


def test_the_process_reads_its_secrets_from_files(tmp_path: Path) -> None:
    """`worker` itself, as a pod starts it: the URL comes from the file (the error names
    where it tried, not the password); both a variable and its file stop it at start."""
    redis_url = tmp_path / "redis"
    redis_url.write_text("redis://:hunter2@127.0.0.1:1/0\n", encoding="utf-8")
    result = run_cli("leader", env={"REDIS_URL_FILE": str(redis_url)})
    assert result.returncode == 1, result.stderr
    assert "cannot reach Redis at 127.0.0.1:1/0" in result.stderr
    assert "hunter2" not in result.stderr
    key = tmp_path / "key"
    key.write_text(WRITE_KEY, encoding="utf-8")
    env = {"WORKER_API_KEY": WRITE_KEY, "WORKER_API_KEY_FILE": str(key)}
    result = run_cli("leader", env=env)
    assert result.returncode == 2, result.stderr
    assert "WORKER_API_KEY and WORKER_API_KEY_FILE are both set" in result.stderr
    assert WRITE_KEY not in result.stderr


# --- job credentials from files ---------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("SHOP_PASSWORD", "SHOP_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_connector_credential_reads_from_its_file(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pw"
    path.write_text("shop-s3cret\n", encoding="utf-8")
    params = {"password_env": "SHOP_PASSWORD"}
    clean_env.setenv("SHOP_PASSWORD_FILE", str(path))
    assert marketplaces._secret(params, "password_env", "shop") == "shop-s3cret"
    assert remote_parsing._env("SHOP_PASSWORD", "shop") == "shop-s3cret"
    clean_env.setenv("SHOP_PASSWORD", "shop-s3cret")  # both: refused, naming both
    for read in (
        lambda: marketplaces._secret(params, "password_env", "shop"),
        lambda: remote_parsing._env("SHOP_PASSWORD", "shop"),
    ):
        with pytest.raises(JobError) as caught:
            read()
        assert "SHOP_PASSWORD and SHOP_PASSWORD_FILE" in str(caught.value)
        assert "'shop'" in str(caught.value)
        assert "shop-s3cret" not in str(caught.value)


def test_a_missing_connector_credential_names_both_ways(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobError, match="SHOP_PASSWORD_FILE") as caught:
        marketplaces._secret({"password_env": "SHOP_PASSWORD"}, "password_env", "shop")
    assert "password_env" in str(caught.value)
    clean_env.setenv("SHOP_PASSWORD_FILE", "/nonexistent/pw")
    with pytest.raises(JobError, match="/nonexistent/pw"):
        remote_parsing._env("SHOP_PASSWORD", "shop")


# --- the status page in a browser: asked for the key on 401 ----------------------------

CHROMIUM = "/usr/bin/chromium"
HAS_CHROMIUM = Path(CHROMIUM).exists()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api")
    if not HAS_CHROMIUM:
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-tools")
    async with playwright.async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.mark.timeout(90)
async def test_the_page_asks_for_the_key_and_then_shows_its_data(
    client: Client, run_id: int, browser: Any
) -> None:
    from playwright.async_api import expect

    expect.set_options(timeout=15_000)
    base = str(client.make_url("")).rstrip("/")
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))

    def watch(request: Any) -> None:
        for value in (READ_KEY, "wrong-key"):
            if value in request.url:
                problems.append(f"a key in a URL: {request.url}")
        # A navigation cannot send the header (it gets the shell); the script's calls do.
        script = not request.is_navigation_request()
        if script and "/static/" not in request.url and "x-api-key" not in request.headers:
            problems.append(f"a call without the key: {request.url}")

    page.on("request", watch)
    await page.goto(f"{base}/")
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog.locator("#key-reason")).to_contain_text("needs a key")
    assert await page.locator("#leader").count() == 0

    # A wrong key is refused, and said so.
    await page.get_by_role("textbox", name="API key").fill("wrong-key")
    await page.get_by_role("button", name="Save key").click()
    await expect(dialog.locator("#key-reason")).to_contain_text("refused")
    await expect(dialog).to_be_visible()

    await page.get_by_role("textbox", name="API key").fill(READ_KEY)
    await page.get_by_role("button", name="Save key").click()
    await expect(page.locator('article[data-job="poke"]')).to_be_visible()
    await expect(page.locator(f'#attention tr[data-key="{run_id}"]')).to_be_visible()
    await expect(page.locator("#sub")).to_contain_text("guarded-replica")
    await expect(page.locator("#live")).to_contain_text("updated")
    assert await page.locator("#live-error").is_hidden()

    # The run's page in the same tab: the key is remembered, nothing asked.
    await page.goto(f"{base}/ui/runs/{run_id}")
    await expect(page.locator("#run [data-f=status]")).to_have_text("queued")
    assert await dialog.is_hidden()
    assert problems == []
    await page.close()


@pytest.mark.timeout(90)
async def test_a_refused_poll_asks_for_the_key(
    make_client: MakeClient, browser: Any, pool: db.Pool
) -> None:
    """A key that stops working (rotated) stops the live updates and asks again."""
    client = await make_client()
    from playwright.async_api import expect

    expect.set_options(timeout=15_000)
    base = str(client.make_url("")).rstrip("/")
    page = await browser.new_page()
    await page.goto(f"{base}/")
    await page.get_by_role("textbox", name="API key").fill(READ_KEY)
    await page.get_by_role("button", name="Save key").click()
    await expect(page.locator('article[data-job="poke"]')).to_be_visible()
    await page.evaluate("sessionStorage.setItem('worker-api-key', 'rotated-away')")
    await page.evaluate("ui.refresh()")
    await expect(page.locator("#live-error")).to_contain_text("the key was refused")
    await expect(page.locator("#key-dialog")).to_be_visible()
    await page.close()


# --- no request chooses what the worker fetches ---------------------------------------

PARSE_JOB = """
[[jobs]]
name = "fienta"
kind = "parse.fienta"
[jobs.params]
timezone = "Europe/Tallinn"
base_url = "https://fienta.example"
"""


async def test_an_operation_cannot_choose_a_url(
    make_client: MakeClient, tmp_path: Path, pool: db.Pool
) -> None:
    path = tmp_path / "parse.toml"
    path.write_text(PARSE_JOB, encoding="utf-8")
    client = await make_client(jobs=load_jobs(path))
    inside = "http://169.254.169.254/latest/meta-data/"
    # The body takes type and meta only...
    for field in ("params", "base_url", "url"):
        body = {"type": "parsingEventsFromFienta", field: inside}
        response = await client.post("/parsing/create", json=body, headers=key(WRITE_KEY))
        await assert_error(response, 400, "unknown_field")
    # ...and meta lands under `meta`: the job's own URL stays.
    meta = {"base_url": inside, "urls": [inside], "listing_url": inside, "cities": ["Tartu"]}
    response = await client.post(
        "/parsing/create",
        json={"type": "parsingEventsFromFienta", "meta": meta},
        headers=key(WRITE_KEY),
    )
    assert response.status == 200, await response.text()
    (run,) = await runs.search(pool)
    assert run["params"]["base_url"] == "https://fienta.example"
    assert set(run["params"]) == {"timezone", "base_url", "meta"}


@pytest.mark.parametrize(
    "path", ["/static/../ui/state", "/static/%2e%2e/ui/state", "/ui/state/", "/./ui/state"]
)
async def test_no_path_trick_reads_without_a_key(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status in (401, 404), await response.text()
    assert "leader" not in await response.text()
