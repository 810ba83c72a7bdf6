"""`worker run | migrate | leader | jobs | runs | operations | products | trigger | cancel |
cleanup-stuck | sandbox`."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
from redis.exceptions import RedisError

from . import backfill, catalog, db, events, jobs, logs, operations, pauses, runs, stuck
from .app import open_redis, serve
from .config import Settings
from .errors import ConfigError, Unreachable
from .lease import Lease
from .web.query import MAX_ID, MAX_LIMIT, MAX_OFFSET

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _settings() -> Settings:
    return Settings.from_env(kinds=jobs.checkers(jobs.kinds()), cross_check=jobs.cross_check)


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    return await serve(settings, jobs.kinds(), cross_check=jobs.cross_check)


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.create_db and await db.create_database_if_missing(settings.database_url):
        print("created database")
    async with db.open_pool(settings.database_url, max_size=1) as pool, pool.acquire() as conn:
        applied = await db.migrate(conn)
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


async def cmd_leader(args: argparse.Namespace, settings: Settings) -> int:
    async with open_redis(settings.redis_url) as redis:
        try:
            current = await Lease(redis, prefix=settings.key_prefix).current()
        except (RedisError, OSError) as exc:
            where = db.where(settings.redis_url)
            raise Unreachable(f"cannot reach Redis at {where} (REDIS_URL): {exc}") from exc
    if args.json:
        print(orjson.dumps(current.as_dict() if current else {"holder": None}).decode())
    elif current is None:
        print("no leader (the lease is free)")
    else:
        print(f"holder   {current.holder}")
        print(f"token    {current.token}")
        print(f"ttl left {current.ttl_ms / 1000:.2f}s")
        print(f"since    {current.since}")
        if current.address:
            print(f"address  {current.address}")
    return 0


async def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        overview = await runs.job_overview(pool, settings.jobs, datetime.now(UTC))
    rows = [runs.public_job(view) for view in overview]
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    if not rows:
        print("no jobs (set WORKER_JOBS_FILE)")
    for r in rows:
        lr = r["last_run"]
        last_txt = f"{lr['status']} #{lr['id']} {lr['created_at'][:19]}" if lr else "never ran"
        nxt = f"PAUSED by {r['paused_by']}" if r.get("paused") else (r["next_slot"] or "-")[:19]
        print(
            f"{r['name']:<24} {r['kind']:<14} {r['schedule'] or '-':<18} {r['timezone']:<18}"
            f" next {nxt}  last {last_txt}"
        )
        if r.get("paused") and r.get("note"):
            print(f"{'':<24} note: {r['note']}")
        if r.get("failure_streak"):
            print(f"{'':<24} {r['failure_streak']} failed runs in a row")
    return 0


async def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        if args.id is not None:
            run = await runs.get(pool, args.id)
            if run is None:
                print(f"no run {args.id}", file=sys.stderr)
                return 1
            print(orjson.dumps(runs.public(run), option=orjson.OPT_INDENT_2).decode())
            return 0
        found = await runs.search(pool, job=args.job, status=args.status, limit=args.limit)
    if args.json:
        print(orjson.dumps([runs.public(r) for r in found]).decode())
        return 0
    for r in map(runs.public, found):
        p = r["progress"] or {}
        prog = p.get("message") or (f"{p.get('done')}/{p.get('total')}" if p else "")
        slot = (r["slot"] or "-")[:19]
        took = r["duration"]
        print(
            f"#{r['id']:<7} {r['job']:<22} {r['status']:<10} {r['trigger']:<8} slot {slot:<19}"
            f" {f'{took:.1f}s' if took is not None else '':>8}  {prog}  {r['error'] or ''}".rstrip()
        )
    if not found:
        print("no runs")
    return 0


async def cmd_operations(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        found = await operations.recent(pool, status=args.status, limit=args.limit)
    views = [{**op.view(), "totalEvents": op.total_events} for op in found]
    if args.json:
        print(orjson.dumps(views).decode())
        return 0
    for v in views:
        processed = "processed" if v["is_processed"] else "unread"
        error = f"error: {v['errorText']}" if v["errorText"] else ""
        tail = "  ".join(t for t in (v["infoText"], error) if t)
        print(
            f"#{v['_id']:<7} {v['type']:<28} {v['status']:<10} {(v['createdAt'] or '-')[:19]}"
            f"  {processed:<9} {v['totalEvents']:>6} events  {tail}".rstrip()
        )
    if not views:
        print("no parsing operations")
    return 0


async def cmd_products(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        total, items = await catalog.search(
            pool,
            source=args.source,
            account=args.account,
            text=args.search,
            include_gone=not args.live,
            limit=args.limit,
            offset=args.offset,
        )
    if args.json:
        print(orjson.dumps({"total": total, "items": [db.jsonable(i) for i in items]}).decode())
        return 0
    for i in items:
        price = f"{i['price']} {i['currency'] or ''}".strip() if i["price"] is not None else "-"
        gone = f"  gone {i['gone_at']:%Y-%m-%d %H:%M}" if i["gone_at"] else ""
        print(
            f"{i['source']:<6} {i['account']:<10} {i['external_id']:<14} {price:>14}"
            f" stock {i['stock'] if i['stock'] is not None else '-':>5}"
            f"  {(i['name'] or '')[:48]}{gone}"
        )
        known = [f"{k} {i[k]}" for k in ("ean", "mpn", "brand") if i.get(k)]
        if i.get("details_at"):
            aspects = len((i.get("details") or {}).get("aspects") or {})
            known.append(f"details {i['details_at']:%Y-%m-%d %H:%M} ({aspects} specifics)")
        elif i.get("details_pending"):
            known.append("details pending")
        if known:
            print(f"{'':<32}{', '.join(known)}")
    shown = f"{args.offset + 1}-{args.offset + len(items)}" if items else "none"
    print(f"{total} products match ({shown} shown)")
    return 0


def _unknown_job(settings: Settings, name: str) -> int:
    if settings.jobs_file is None:
        print("no jobs file: set WORKER_JOBS_FILE to the replicas' jobs file", file=sys.stderr)
    else:
        known = ", ".join(j.name for j in settings.jobs) or "none"
        print(f"unknown job {name!r} (known: {known})", file=sys.stderr)
    return 2


async def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    if settings.job(args.job) is None:
        return _unknown_job(settings, args.job)
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        row = await pauses.pause(pool, args.job, by="cli", note=args.note)
    since = f"{row['paused_at']:%Y-%m-%d %H:%M:%S %Z}"
    print(f"{args.job}: paused since {since} by {row['paused_by']}: {row['pause_note'] or '-'}")
    print("slots that come due while it is paused will not be run, not even after resuming")
    return 0


async def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    if settings.job(args.job) is None:
        return _unknown_job(settings, args.job)
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        row = await pauses.resume(pool, args.job)
    span = (
        f" (paused from {row['last_paused_at']:%Y-%m-%d %H:%M:%S} to"
        f" {row['resumed_at']:%Y-%m-%d %H:%M:%S %Z}; those slots are not owed)"
        if row["last_paused_at"] and row["resumed_at"]
        else ""
    )
    print(f"{args.job}: resumed{span}")
    return 0


async def cmd_trigger(args: argparse.Namespace, settings: Settings) -> int:
    spec = settings.job(args.job)
    if spec is None:
        return _unknown_job(settings, args.job)
    if not spec.manual:
        print(f"job {args.job!r} has manual = false", file=sys.stderr)
        return 2
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        run_id = await runs.enqueue(
            pool, job=spec.name, kind=spec.kind, params=spec.params, requested_by="cli"
        )
        print(f"queued run {run_id}")
        if not args.wait:
            return 0
        return await _follow(pool, run_id)


async def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    spec = settings.job(args.job)
    if spec is None:
        return _unknown_job(settings, args.job)
    if not spec.manual:
        print(f"job {args.job!r} has manual = false", file=sys.stderr)
        return 2
    try:
        start = backfill.bound(args.start, spec, "--from")
        end = backfill.bound(args.end, spec, "--to")
        slots = backfill.slots_in(spec, start, end, now=datetime.now(UTC), limit=args.max)
    except backfill.BackfillError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        done = await backfill.queue(pool, spec, slots, requested_by="cli")
    answer = done.public()
    if args.json:
        print(orjson.dumps(answer).decode())
        return 0
    span = f" ({answer['first']} to {answer['last']})" if slots else ""
    print(f"{spec.name}: {len(slots)} slot(s) in the range{span}")
    print(f"queued {done.queued}; skipped {len(done.skipped)} that already had a row")
    for slot in answer["skipped_slots"]:
        print(f"  skipped {slot}")
    return 0


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        before = await runs.request_cancel(pool, args.run_id, by="cli")
        if before is None:
            print(f"no run {args.run_id}", file=sys.stderr)
            return 1
        if before == "queued":
            print(f"run {args.run_id} cancelled before it started")
            return 0
        if before != "running":
            print(f"run {args.run_id} already ended: {before}", file=sys.stderr)
            return 1
        print(f"run {args.run_id}: cancel requested; the leader stops it")
        if not args.wait:
            return 0
        return await _follow(pool, args.run_id, ok=("cancelled", "succeeded"))


async def cmd_cleanup_stuck(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        ended = await stuck.clean_up(pool, minutes=args.minutes, settings=settings, by="cli")
    if args.json:
        print(orjson.dumps({"count": len(ended), "ids": [r["id"] for r in ended]}).decode())
        return 0
    if not ended:
        print(
            f"no stuck runs: none running for over {args.minutes} min with no heartbeat"
            f" for {stuck.span(stuck.silence(settings))}"
        )
        return 0
    print(f"{len(ended)} stuck run(s) marked failed: {', '.join(str(r['id']) for r in ended)}")
    for r in ended:
        print(f"  #{r['id']} {r['job']}: {r['error']}")
    return 0


async def _follow(pool: db.Pool, run_id: int, ok: tuple[str, ...] = ("succeeded",)) -> int:
    """Print progress of a run until it ends; exit 0 if it succeeded."""
    shown = ""
    while True:
        found = await runs.get(pool, run_id)
        assert found is not None
        run = runs.public(found)
        msg = (run["progress"] or {}).get("message") or ""
        line = f"run {run_id}: {run['status']}{' - ' + msg if msg else ''}"
        if line != shown:
            print(line, flush=True)
            shown = line
        if run["status"] in runs.FINAL:
            if run["error"]:
                print(f"error: {run['error']}")
            return 0 if run["status"] in ok else 1
        await asyncio.sleep(0.5)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit 2 (argparse would print the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bound(*, end: bool) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        try:
            return events.day_or_instant(text, end=end)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


async def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_pool(settings.database_url, max_size=1) as pool:
        total, items = await events.search(
            pool,
            source=args.source,
            city=args.city,
            starts_from=args.starts_from,
            starts_to=args.starts_to,
            text=args.search,
            limit=args.limit,
            offset=args.offset,
        )
    if args.json:
        print(orjson.dumps({"total": total, "items": [db.jsonable(i) for i in items]}).decode())
        return 0
    for e in items:
        when = f"{e['starts_at']:%Y-%m-%d %H:%M}Z" if e.get("starts_at") else "-"
        where = ", ".join(str(x) for x in (e.get("venue"), e.get("city")) if x)
        print(f"{e['source']:<12} {when:<17} {(e.get('title') or '')[:50]:<50}  {where}")
    shown = f"{args.offset + 1}-{args.offset + len(items)}" if items else "none"
    print(f"{total} events match ({shown} shown)")
    return 0


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `lo` to `hi`."""

    def parse(raw: str) -> int:
        value = int(raw) if re.fullmatch(r"-?[0-9]{1,30}", raw) else None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {lo} to {hi}, got {raw[:40]!r}"
            )
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="worker",
        description="Runs scheduled syncs from many replicas; one leader at a time.",
        epilog="Configuration comes from the environment: see README.md.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run a replica: HTTP server, leader election, scheduler")
    m = sub.add_parser("migrate", help="apply database migrations")
    m.add_argument("--create-db", action="store_true", help="create the database if missing")
    lp = sub.add_parser("leader", help="who holds the lease: holder, token, TTL left, since")
    lp.add_argument("--json", action="store_true", help="print JSON")
    jp = sub.add_parser("jobs", help="configured jobs with next slot and last run")
    jp.add_argument("--json", action="store_true", help="print JSON")
    rp = sub.add_parser("runs", help="recent runs with status and progress")
    rp.add_argument("--job", help="only this job")
    rp.add_argument("--status", choices=runs.STATUSES, help="only runs with this status")
    rp.add_argument(
        "--limit", type=_whole(1, MAX_LIMIT), default=20, help="how many (default 20, at most 1000)"
    )
    rp.add_argument("--id", type=_whole(1, MAX_ID), help="show one run in full")
    rp.add_argument("--json", action="store_true", help="print JSON")
    op = sub.add_parser("operations", help="parsing operations (seed 001), newest first")
    op.add_argument("--status", choices=operations.SEED_STATUSES, help="only this status")
    op.add_argument(
        "--limit", type=_whole(1, MAX_LIMIT), default=20, help="how many (default 20, at most 1000)"
    )
    op.add_argument("--json", action="store_true", help="print JSON")
    pp = sub.add_parser("products", help="query the synced catalogue")
    pp.add_argument("--source", help="emag, ebay, …")
    pp.add_argument("--account", help="the account name given in the job's params")
    pp.add_argument("--search", help="text in the name or sku, or an exact ean or id")
    pp.add_argument("--live", action="store_true", help="leave out items marked gone")
    pp.add_argument(
        "--limit", type=_whole(1, MAX_LIMIT), default=20, help="how many (default 20, at most 1000)"
    )
    pp.add_argument(
        "--offset", type=_whole(0, MAX_OFFSET), default=0, help="skip this many (default 0)"
    )
    pp.add_argument("--json", action="store_true", help="print JSON")
    ep = sub.add_parser("events", help="query the events filed from parsing operations")
    ep.add_argument("--source", help="fienta, eventim, kontramarka, …")
    ep.add_argument("--city", help="the city, as the event gives it (any case)")
    ep.add_argument("--from", dest="starts_from", type=_bound(end=False), help="starts on or after")
    ep.add_argument("--to", dest="starts_to", type=_bound(end=True), help="starts on or before")
    ep.add_argument("--search", help="text in the title or the venue")
    ep.add_argument(
        "--limit", type=_whole(1, MAX_LIMIT), default=20, help="how many (default 20, at most 1000)"
    )
    ep.add_argument(
        "--offset", type=_whole(0, MAX_OFFSET), default=0, help="skip this many (default 0)"
    )
    ep.add_argument("--json", action="store_true", help="print JSON")
    pa = sub.add_parser("pause", help="pause JOB's schedule (its slots are not owed meanwhile)")
    pa.add_argument("job", metavar="JOB")
    pa.add_argument("--note", default="", help="why (shown on the job)")
    ra = sub.add_parser("resume", help="resume JOB's schedule from now")
    ra.add_argument("job", metavar="JOB")
    tp = sub.add_parser("trigger", help="queue a manual run of JOB (the leader picks it up)")
    tp.add_argument("job", metavar="JOB")
    tp.add_argument("--wait", action="store_true", help="follow the run until it ends")
    bp = sub.add_parser("backfill", help="queue every slot of JOB's schedule in a past range")
    bp.add_argument("job", metavar="JOB")
    bp.add_argument("--from", dest="start", required=True, help="a date or date-time with offset")
    bp.add_argument("--to", dest="end", required=True, help="a date or date-time, not after now")
    bp.add_argument(
        "--max",
        type=_whole(1, backfill.HARD_MAX),
        default=backfill.DEFAULT_MAX,
        help=f"refuse a range of more slots (default {backfill.DEFAULT_MAX})",
    )
    bp.add_argument("--json", action="store_true", help="print JSON")
    cp = sub.add_parser("cancel", help="cancel a queued or running run")
    cp.add_argument("run_id", type=_whole(1, MAX_ID), metavar="RUN_ID")
    cp.add_argument("--wait", action="store_true", help="follow the run until it has stopped")
    sp = sub.add_parser(
        "cleanup-stuck", help="mark failed the runs stuck in running (silent heartbeat)"
    )
    sp.add_argument(
        "--minutes",
        type=_whole(stuck.MIN_MINUTES, stuck.MAX_MINUTES),
        default=stuck.DEFAULT_MINUTES,
        help=f"only runs running longer than this (default {stuck.DEFAULT_MINUTES},"
        f" {stuck.MIN_MINUTES} to {stuck.MAX_MINUTES})",
    )
    sp.add_argument("--json", action="store_true", help='print {"count", "ids"}')
    sub.add_parser(
        "sandbox", help="run the local sandbox marketplace (eMAG + eBay)", add_help=False
    )
    return p


COMMANDS: dict[str, Command] = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "leader": cmd_leader,
    "jobs": cmd_jobs,
    "runs": cmd_runs,
    "operations": cmd_operations,
    "trigger": cmd_trigger,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "products": cmd_products,
    "events": cmd_events,
    "cancel": cmd_cancel,
    "cleanup-stuck": cmd_cleanup_stuck,
    "backfill": cmd_backfill,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        from .sandbox.app import main as sandbox_main

        return sandbox_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = _settings()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    # One-shot commands print their own results; their logs only matter when something is wrong.
    level = (
        settings.log_level
        if args.command == "run" or "WORKER_LOG_LEVEL" in os.environ
        else "WARNING"
    )
    logs.setup(fmt=settings.log_format, level=level, worker_id=settings.worker_id)
    try:
        return asyncio.run(COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        return 130
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found only once running, e.g. a port already taken
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError) as exc:
        print(f"error: cannot reach a service: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
