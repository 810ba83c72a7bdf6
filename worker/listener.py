"""LISTEN for queued runs and cancel requests on a connection of its own.

The pool's connections stay free for work: a LISTEN holds its connection for the
whole term. When the connection drops, it is opened again; until then the leader's
one-second poll covers for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from . import db

log = logging.getLogger(__name__)

RECONNECT_EVERY = 2.0


async def listen_forever(dsn: str, wake: asyncio.Event, *, timeout: float) -> None:
    """Set `wake` on every notification on the runs channel; never returns."""

    def on_notify(*_: object) -> None:
        wake.set()

    while True:
        conn: db.Connection | None = None
        lost = asyncio.Event()
        try:
            conn = await db.connect(dsn, timeout=timeout)
            conn.add_termination_listener(functools.partial(_set, lost))
            await conn.add_listener(db.NOTIFY_CHANNEL, on_notify)
            wake.set()  # whatever was queued while we were not listening
            await lost.wait()
            log.warning("LISTEN connection lost; polling until it is back")
        except db.DB_ERRORS as exc:
            log.warning("LISTEN failed (%s); polling until it is back", exc)
        finally:
            if conn is not None:
                with contextlib.suppress(*db.DB_ERRORS):
                    await asyncio.wait_for(conn.close(), timeout=1.0)
        await asyncio.sleep(RECONNECT_EVERY)


def _set(event: asyncio.Event, *_: object) -> None:
    event.set()
