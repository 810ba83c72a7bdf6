"""The lease scripts against a real Redis: ownership checks, monotonic tokens, release."""

from __future__ import annotations

import asyncio

import orjson
from redis.asyncio import Redis

from worker.lease import Lease


async def test_acquire_sets_readable_json_and_ttl(redis: Redis, key_prefix: str) -> None:
    lease = Lease(redis, prefix=key_prefix)
    grant, _ = await lease.acquire(holder="pod-a", ttl=2.0, address="http://pod-a:8080")
    assert grant is not None
    raw = await redis.get(f"{key_prefix}leader")
    data = orjson.loads(raw)
    assert data["holder"] == "pod-a"
    assert data["token"] == grant.token
    assert data["address"] == "http://pod-a:8080"
    assert 1500 < await redis.pttl(f"{key_prefix}leader") <= 2000


async def test_second_acquire_is_refused_with_pttl(redis: Redis, key_prefix: str) -> None:
    lease = Lease(redis, prefix=key_prefix)
    first, _ = await lease.acquire(holder="a", ttl=5.0)
    second, pttl = await lease.acquire(holder="b", ttl=5.0)
    assert first is not None
    assert second is None
    assert 4000 < pttl <= 5000
    current = await lease.current()
    assert current is not None
    assert current.holder == "a"


async def test_tokens_strictly_increase_across_grants(redis: Redis, key_prefix: str) -> None:
    lease = Lease(redis, prefix=key_prefix)
    tokens = []
    for holder in ("a", "b", "c", "a"):
        grant, _ = await lease.acquire(holder=holder, ttl=5.0)
        assert grant is not None
        tokens.append(grant.token)
        assert await lease.release(grant)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 4


async def test_renew_and_release_check_the_owner(redis: Redis, key_prefix: str) -> None:
    lease = Lease(redis, prefix=key_prefix)
    old, _ = await lease.acquire(holder="a", ttl=0.2)
    assert old is not None
    await asyncio.sleep(0.3)  # expired
    new, _ = await lease.acquire(holder="b", ttl=5.0)
    assert new is not None
    # The old holder's renew and release must not touch b's lease.
    assert not await lease.renew(old, ttl=5.0)
    assert not await lease.release(old)
    current = await lease.current()
    assert current is not None
    assert current.holder == "b"
    assert current.token == new.token
    assert await lease.renew(new, ttl=10.0)
    assert await redis.pttl(f"{key_prefix}leader") > 9000


async def test_release_publishes_for_followers(redis: Redis, key_prefix: str) -> None:
    lease = Lease(redis, prefix=key_prefix)
    pubsub = redis.pubsub()
    await pubsub.subscribe(lease.channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    grant, _ = await lease.acquire(holder="a", ttl=5.0)
    assert grant is not None
    assert await lease.release(grant)
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
    assert msg is not None
    assert msg["data"] == grant.raw
    assert await lease.current() is None
    await pubsub.aclose()
