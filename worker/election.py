"""The elector actor: campaigns for the lease, runs leader work while it holds it.

Like client-go's leaderelection: acquire -> start leader work as a child task ->
renew every ttl/3 -> on losing the lease, on missing the renew deadline (monotonic
clock) or on shutdown, cancel the leader work *before* the lease can expire
elsewhere, then release. Followers wait min(retry, PTTL), or less when the holder
announces its release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import metrics
from .config import LeaseSettings
from .lease import Grant, Lease

log = logging.getLogger(__name__)

LeaderWork = Callable[[Grant], Coroutine[Any, Any, None]]


class StepDown(Exception):
    """Raised by leader work that wants to give up leadership (e.g. it was fenced).

    `fence` is the newer token found in the fence, when that was the reason.
    """

    def __init__(self, message: str, *, fence: int | None = None) -> None:
        super().__init__(message)
        self.fence = fence


@dataclass(frozen=True)
class Leadership:
    """This replica's view of its own role."""

    leader: bool = False
    token: int | None = None
    since: str | None = None


class Elector:
    """Campaign for the lease under `worker_id`; call `work(grant)` while leading."""

    def __init__(
        self,
        *,
        redis: Redis,
        lease: Lease,
        settings: LeaseSettings,
        worker_id: str,
        work: LeaderWork,
        address: str = "",
        work_grace: float = 10.0,
    ) -> None:
        settings.validate()
        self.redis = redis
        self.lease = lease
        self.settings = settings
        self.worker_id = worker_id
        self.address = address
        self.work = work
        self.work_grace = work_grace
        self.state = Leadership()
        self.last_renew = 0.0
        self._wake = asyncio.Event()

    def healthy(self) -> bool:
        """False when we believe we lead but have not renewed within the deadline."""
        if not self.state.leader:
            return True
        return self._now() - self.last_renew <= self.settings.deadline

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign until `stop` is set; returns after releasing any lease held."""
        listener = asyncio.create_task(self._listen_releases(stop), name="lease-listener")
        try:
            while not stop.is_set():
                # Cleared before asking, so a release announced while we ask still wakes us.
                self._wake.clear()
                # The lease's TTL starts when Redis runs the script, after we send it: a
                # term's clock starts at the send, never at the (later) reply.
                sent = self._now()
                try:
                    grant, pttl_ms = await asyncio.wait_for(
                        self.lease.acquire(
                            holder=self.worker_id, ttl=self.settings.ttl, address=self.address
                        ),
                        timeout=self.settings.retry_period,
                    )
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("lease acquire failed: %s", exc)
                    await self._pause(stop, self.settings.retry_period)
                    continue
                if grant is None:
                    wait = self.settings.retry_period
                    if pttl_ms >= 0:
                        wait = min(wait, pttl_ms / 1000)
                    await self._pause(stop, wait)
                    continue
                reason = await self._lead(grant, stop, sent=sent)
                if reason != "shutdown" and not stop.is_set():
                    # Let another replica have a go before campaigning again.
                    await self._pause(stop, self.settings.retry_period, wakeable=False)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _lead(self, grant: Grant, stop: asyncio.Event, *, sent: float) -> str:
        """Lead until something ends the term; returns why it ended."""
        self.last_renew = sent
        self.state = Leadership(leader=True, token=grant.token, since=grant.since)
        metrics.LEADER.set(1)
        metrics.LEADER_TOKEN.set(grant.token)
        metrics.LEADER_TRANSITIONS.inc()
        log.info("became leader", extra={"token": grant.token})
        work = asyncio.create_task(self.work(grant), name=f"leader-work-{grant.token}")
        reason = "shutdown"
        try:
            reason = await self._hold(grant, stop, work)
        finally:
            held = reason not in ("lease lost", "renew deadline missed")
            await self._stop_work(work, reason)
            self.state = Leadership()
            metrics.LEADER.set(0)
            metrics.LEADER_TOKEN.set(0)
            metrics.LEADER_TRANSITIONS.inc()
            if held:
                await self._release(grant)
            log.info("stepped down: %s", reason, extra={"token": grant.token})
        return reason

    async def _hold(self, grant: Grant, stop: asyncio.Event, work: asyncio.Task[None]) -> str:
        """Renew until the term ends. Leader work is stopped no later than `deadline`
        after the *send* time of the last successful renew, whatever Redis does: every
        wait below ends by then."""
        stopping = asyncio.create_task(stop.wait(), name="stop-wait")
        try:
            next_renew = self.last_renew + self.settings.renew_every
            while True:
                must_stop = self.last_renew + self.settings.deadline
                timeout = max(0.0, min(next_renew, must_stop) - self._now())
                await asyncio.wait({stopping, work}, timeout=timeout, return_when="FIRST_COMPLETED")
                if stop.is_set():
                    return "shutdown"
                if work.done():
                    return await self._work_ended(grant, work)
                # Checked before renewing: after a freeze (GC, SIGSTOP) the deadline
                # may already be gone even though a renew might still succeed.
                left = must_stop - self._now()
                if left <= 0:
                    return "renew deadline missed"
                sent = self._now()
                try:
                    renewed = await asyncio.wait_for(
                        self.lease.renew(grant, ttl=self.settings.ttl), timeout=left
                    )
                except (RedisError, OSError, TimeoutError) as exc:
                    metrics.LEASE_RENEW_FAILURES.inc()
                    log.warning("lease renew failed: %s", exc, extra={"token": grant.token})
                    next_renew = self._now() + self.settings.retry_period
                    continue
                if not renewed:
                    metrics.LEASE_RENEW_FAILURES.inc()
                    return "lease lost"
                self.last_renew = sent
                next_renew = sent + self.settings.renew_every
        finally:
            stopping.cancel()

    async def _work_ended(self, grant: Grant, work: asyncio.Task[None]) -> str:
        if work.cancelled():
            return "leader work cancelled"
        exc = work.exception()
        if exc is None:
            return "leader work ended"
        if isinstance(exc, StepDown):
            if exc.fence is not None and exc.fence >= grant.token:
                await self._catch_up_epoch(exc.fence)
            return f"leader work stepped down: {exc}"
        raise exc

    async def _catch_up_epoch(self, fence: int) -> None:
        """The fence is ahead of Redis' token counter (Redis lost it): move the counter past
        it, so the next grant carries a token the fence accepts instead of climbing one
        refused grant at a time."""
        try:
            await asyncio.wait_for(self.lease.raise_epoch(fence), timeout=2.0)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not raise the token counter to the fence: %s", exc)
        else:
            log.warning("token counter was behind the fence (%d): raised", fence)

    async def _stop_work(self, work: asyncio.Task[None], reason: str) -> None:
        if work.done():
            return
        work.cancel(reason)
        done, _ = await asyncio.wait({work}, timeout=self.work_grace)
        if not done:
            log.error("leader work did not stop within %.1fs", self.work_grace)
        elif not work.cancelled() and work.exception() is not None:
            log.error("leader work failed while stopping", exc_info=work.exception())

    async def _release(self, grant: Grant) -> None:
        try:
            released = await asyncio.wait_for(self.lease.release(grant), timeout=2.0)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("lease release failed (it will expire): %s", exc)
            return
        if not released:
            log.warning("lease was no longer ours at release")

    async def _pause(self, stop: asyncio.Event, seconds: float, *, wakeable: bool = True) -> None:
        """Sleep up to `seconds`, ending early on stop or (if wakeable) a release notice."""
        waiters = [asyncio.ensure_future(stop.wait())]
        if wakeable:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=max(seconds, 0.0), return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _listen_releases(self, stop: asyncio.Event) -> None:
        """Wake the campaign loop as soon as any holder announces a release."""
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.lease.channel)
                while not stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None:
                        self._wake.set()
            except (RedisError, OSError) as exc:
                log.debug("release listener reconnecting: %s", exc)
                await asyncio.sleep(self.settings.retry_period)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
