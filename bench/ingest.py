"""Catalogue ingest speed and memory: the real eMAG sync against the local sandbox.

In one run it measures, against the same database:
  - the sync of 10 000 and of 100 000 offers (rate limit lifted), each in a fresh
    child process so its peak RSS is its own: items/s and peak RSS;
  - a second pass over the 100 000 unchanged offers (nothing is rewritten);
  - a naive loop, one `INSERT … ON CONFLICT` per item (the seeds' way), timed on
    a sample and reported per second;
  - a bare `COPY` of the same 100 000 rows into an empty table: the ceiling.

    .venv/bin/python bench/ingest.py [--items 100000] [--naive-sample 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import free_port
from worker import db
from worker.catalog import Item
from worker.config import JobSpec
from worker.context import RunContext
from worker.jobs.marketplaces import EmagOffersJob
from worker.ratelimit import Rate, RateLimiter
from worker.upstream import open_upstream

DSN = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/worker_bench")
ENV = {"BENCH_EMAG_USER": "main@example.com", "BENCH_EMAG_PASS": "main-secret"}


async def sync_once(base_url: str, account: str) -> dict[str, float]:
    """One full sync in this process; returns items/s and peak RSS."""
    os.environ.update(ENV)
    async with db.open_pool(DSN) as pool, open_upstream(limiter=RateLimiter(Rate(calls=0))) as up:
        await db.raise_fence(pool, token=int(time.time() * 1000), holder="bench")
        token = await pool.fetchval("SELECT token FROM fence")
        run_id = await pool.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, token, started_at)"
            " VALUES ('bench', 'emag.offers', 'manual', 'running', $1, now()) RETURNING id",
            token,
        )
        params = {
            "account": account,
            "base_url": base_url,
            "username_env": "BENCH_EMAG_USER",
            "password_env": "BENCH_EMAG_PASS",
            "rate_limit": 0,
            "prefetch": 4,
        }
        spec = JobSpec(name="bench", kind="emag.offers", schedule=None, params=params)
        ctx = RunContext(
            run_id=run_id,
            job=spec,
            token=token,
            trigger="manual",
            slot=None,
            params=params,
            pool=pool,
            upstream=up,
            worker_id="bench",
        )
        started = time.perf_counter()
        result = await EmagOffersJob().run(ctx)
        took = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**result, "seconds": took, "rate": result["items"] / took, "rss_mb": rss_mb}


def child_sync(base_url: str, account: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", base_url, "--account", account],
        capture_output=True,
        check=True,
    )
    parsed: dict[str, float] = orjson.loads(out.stdout.splitlines()[-1])
    return parsed


def start_sandbox(items: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "sandbox",
            "--port",
            str(port),
            "--rate",
            "0",
            "--emag-items",
            str(items),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    import socket

    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("sandbox did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/emag/ro/api-3"


def as_row(it: Item) -> tuple[object, ...]:
    raw = orjson.dumps(it.raw, option=orjson.OPT_SORT_KEYS)
    return (
        "emag",
        "bench",
        it.external_id,
        it.name,
        it.sku,
        it.ean,
        it.price,
        it.currency,
        it.stock,
        it.status,
        it.url,
        raw.decode(),
        hashlib.blake2b(raw, digest_size=16).digest(),
    )


async def naive_and_copy(items: list[Item], sample: int) -> tuple[float, float]:
    """Items/s of a per-row INSERT … ON CONFLICT loop and of a bare COPY."""
    rows = [as_row(it) for it in items]  # the same rows for both, encoded as the sync does
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute("DROP TABLE IF EXISTS naive_products")
        await conn.execute("CREATE TABLE naive_products (LIKE products INCLUDING ALL)")
        started = time.perf_counter()
        for row in rows[:sample]:
            await conn.execute(
                "INSERT INTO naive_products (source, account, external_id, name, sku, ean,"
                " price, currency, stock, status, url, raw, hash)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13)"
                " ON CONFLICT (source, account, external_id) DO UPDATE"
                " SET name = EXCLUDED.name, price = EXCLUDED.price, raw = EXCLUDED.raw",
                *row,
            )
        naive = sample / (time.perf_counter() - started)
        await conn.execute("TRUNCATE naive_products")
        await conn.execute(
            "CREATE TEMP TABLE copy_stage (source text, account text, external_id text,"
            " name text, sku text, ean text, price numeric, currency text, stock integer,"
            " status text, url text, raw text, hash bytea)"
        )
        started = time.perf_counter()
        await conn.copy_records_to_table("copy_stage", records=rows)
        await conn.execute(
            "INSERT INTO naive_products (source, account, external_id, name, sku, ean, price,"
            " currency, stock, status, url, raw, hash) SELECT source, account, external_id,"
            " name, sku, ean, price, currency, stock, status, url, raw::jsonb, hash"
            " FROM copy_stage"
        )
        copy = len(items) / (time.perf_counter() - started)
        await conn.execute("DROP TABLE naive_products")
    finally:
        await conn.close()
    return naive, copy


async def fetch_items(base_url: str, n: int) -> list[Item]:
    """The same offers the sync stores, for the naive loop and the COPY ceiling."""
    from worker.connectors.emag import EmagOffers

    items: list[Item] = []
    async with open_upstream(limiter=RateLimiter(Rate(calls=0))) as up:
        conn = EmagOffers(
            upstream=up,
            base_url=base_url,
            account="x",
            username=ENV["BENCH_EMAG_USER"],
            password=ENV["BENCH_EMAG_PASS"],
            prefetch=4,
        )
        async for page in conn.pages(None):
            items.extend(page.items)
            if len(items) >= n:
                break
    return items[:n]


async def main() -> int:
    parser = argparse.ArgumentParser(description="catalogue ingest benchmark")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=5_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--account", default="bench")
    args = parser.parse_args()
    if args.child:
        print(orjson.dumps(await sync_once(args.child, args.account)).decode())
        return 0

    await db.create_database_if_missing(DSN)
    conn = await asyncpg.connect(DSN)
    await db.migrate(conn)
    await conn.execute("TRUNCATE products, sync_seen")
    await conn.close()
    small, small_url = start_sandbox(args.items // 10)
    big, big_url = start_sandbox(args.items)
    try:
        r_small = child_sync(small_url, "small")
        r_big = child_sync(big_url, "big")
        r_again = child_sync(big_url, "big")
        fetch_started = time.perf_counter()
        items = await fetch_items(big_url, args.items)
        fetch_rate = len(items) / (time.perf_counter() - fetch_started)
        naive, copy = await naive_and_copy(items, args.naive_sample)
    finally:
        small.terminate()
        big.terminate()
    n_small, n_big = int(r_small["items"]), int(r_big["items"])
    print(
        f"sync {n_small:>7} offers: {r_small['rate']:>8.0f} items/s"
        f"  peak RSS {r_small['rss_mb']:.0f} MB"
    )
    print(
        f"sync {n_big:>7} offers: {r_big['rate']:>8.0f} items/s  peak RSS {r_big['rss_mb']:.0f} MB"
        f"  ({r_big['created']:.0f} created)"
    )
    print(
        f"resync unchanged : {r_again['rate']:>8.0f} items/s"
        f"  ({r_again['unchanged']:.0f} unchanged,"
        f" {r_again['updated']:.0f} updated)"
    )
    print(f"naive per-row INSERT ON CONFLICT ({args.naive_sample} rows): {naive:>8.0f} items/s")
    print(
        f"bare COPY + INSERT of the same {len(items)} rows (database ceiling): {copy:>8.0f} items/s"
    )
    print(f"fetch + map the same pages, no database (upstream ceiling): {fetch_rate:>8.0f} items/s")
    print()
    growth = r_big["rss_mb"] - r_small["rss_mb"]
    print(f"sync / naive   = {r_big['rate'] / naive:5.1f}x   (target >= 20x)")
    print(f"sync / database ceiling = {r_big['rate'] / copy:5.2f}")
    print(f"sync / upstream ceiling = {r_big['rate'] / fetch_rate:5.2f}")
    print(f"database ceiling / naive = {copy / naive:5.1f}x  (the most any sync could reach)")
    print(f"sync rate      = {r_big['rate']:.0f}/s (target >= 30 000/s)")
    print(f"RSS growth 10x catalogue = {growth:.1f} MB (target <= 50 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
