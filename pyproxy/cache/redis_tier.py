"""L2: records in Redis or a Redis Cluster, shared by every proxy instance.

Keys, under a prefix (default ``pyproxy:cache:``):

- ``{prefix}e:{key}``  the record (``SET … PX ttl``: Redis expires it);
- ``{prefix}t:{tag}``  a set of the keys carrying the tag; it lives as long as its longest-lived
  member (``EXPIRE … NX`` then ``EXPIRE … GT`` on each write; no TTL while a member has none).
  Members that expired on their own stay until the set does — a purge deleting a missing key is a
  no-op;
- ``{prefix}d:{tag}``  a set of the tags that depend on it (``tags.py``), so any instance's purge
  cascades through dependencies another instance learned;
- channel ``{prefix}purge``  purge messages, so every instance drops what it holds alone (its memory,
  an embedded SQLite file) within a round trip.

In a cluster these keys hash to different slots: reads and writes are single-key, and the multi-key
ones (``DEL`` of many keys, a write's pipeline) are split by slot by redis-py's cluster client.
Publish/subscribe reaches every node of a cluster (the cluster bus forwards it), so the subscription
is a plain connection to one node.

Every failure of Redis (connection refused, timeout, cluster down, out of memory) is raised as
:class:`~pyproxy.errors.TierUnavailable`.
"""

from __future__ import annotations

import json
import logging
import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from pyproxy.errors import TierUnavailable

__all__ = ["RedisTier"]

log = logging.getLogger("pyproxy.cache.redis")

_FAILURES = (RedisError, RedisClusterException, OSError)


class RedisTier:
    """A tier over a ``redis.asyncio`` client (single server or cluster)."""

    name = "redis"
    shared = True
    verify = True
    compressed = True

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "pyproxy:cache:",
        owns_client: bool = False,
        pubsub_client: Redis | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._pubsub_client = pubsub_client
        self.channel = f"{prefix}purge"

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, prefix: str = "pyproxy:cache:", connect_timeout: float = 0.5) -> RedisTier:
        """A tier on its own client for ``url`` (``cluster=True``: any node of a Redis Cluster)."""
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, socket_connect_timeout=connect_timeout)
        else:
            client = Redis.from_url(url, socket_connect_timeout=connect_timeout)
        return cls(client, prefix=prefix, owns_client=True)

    def entry_key(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def tag_key(self, tag: str) -> str:
        return f"{self.prefix}t:{tag}"

    def dependents_key(self, tag: str) -> str:
        return f"{self.prefix}d:{tag}"

    async def _call(self, what: str, op: Awaitable[Any]) -> Any:
        try:
            return await op
        except _FAILURES as e:
            raise TierUnavailable(f"redis {what} failed: {e}") from e

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._call("GET", self.client.get(self.entry_key(key)))
        return value

    async def set(self, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        ek = self.entry_key(key)
        if ttl is not None and ttl <= 0:
            await self._call("DEL", self.client.delete(ek))
            return
        ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
        pipe = self.client.pipeline(transaction=False)
        pipe.set(ek, record, px=ttl_ms)
        for tag in tags:
            tk = self.tag_key(tag)
            pipe.sadd(tk, key)
            if ttl_ms is None:
                pipe.persist(tk)
            else:
                pipe.pexpire(tk, ttl_ms, nx=True)
                pipe.pexpire(tk, ttl_ms, gt=True)
        await self._call("write pipeline", pipe.execute())

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        n: int = await self._call("DEL", self.client.delete(*(self.entry_key(k) for k in keys)))
        return int(n)

    async def purge_tags(self, tags: Iterable[str]) -> int:
        tags = list(tags)
        if not tags:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.smembers(self.tag_key(tag))
        members: list[builtins.set[bytes]] = await self._call("SMEMBERS", pipe.execute())
        keys = sorted({m.decode() for ms in members for m in ms})
        removed = await self.delete(keys)
        await self._call("DEL", self.client.delete(*(self.tag_key(t) for t in tags)))
        return removed

    async def add_dependency(self, dependent: str, on: str) -> None:
        await self._call("SADD", self.client.sadd(self.dependents_key(on), dependent))

    async def dependents(self, tags: list[str]) -> builtins.set[str]:
        """Tags depending directly on any of ``tags``, as recorded in Redis by any instance."""
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.smembers(self.dependents_key(tag))
        found: list[builtins.set[bytes]] = await self._call("SMEMBERS", pipe.execute())
        return {m.decode() for ms in found for m in ms}

    # -- purge fan-out ------------------------------------------------------------------------------

    async def publish(self, message: dict[str, object]) -> None:
        await self._call("PUBLISH", self.client.publish(self.channel, json.dumps(message)))

    async def _subscriber_client(self) -> Redis:
        if self._pubsub_client is None:
            if isinstance(self.client, RedisCluster):
                await self._call("cluster discovery", self.client.initialize())  # learns the nodes
                node = self.client.get_default_node()
                self._pubsub_client = Redis(host=node.host, port=int(node.port))
            else:
                self._pubsub_client = self.client
        return self._pubsub_client

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Purge messages as they are published (by any instance), until cancelled. Raises
        :class:`TierUnavailable` when the subscription breaks (the caller resubscribes)."""
        pubsub = (await self._subscriber_client()).pubsub(ignore_subscribe_messages=True)
        try:
            await self._call("SUBSCRIBE", pubsub.subscribe(self.channel))
            me = asyncio.current_task()
            while True:
                raw: dict[str, Any] | None = await self._call("pubsub read", pubsub.get_message(timeout=1.0))
                if me is not None and me.cancelling():
                    # redis-py's read can swallow a cancellation (it returns None instead): honour it.
                    raise asyncio.CancelledError
                if raw is None or raw.get("type") != "message":
                    continue
                try:
                    message = json.loads(raw["data"])
                except ValueError:
                    log.warning("ignoring a malformed purge message on %s", self.channel)
                    continue
                if isinstance(message, dict):
                    yield message
        finally:
            # Bounded: a subscription cancelled while it was still connecting can leave redis-py's
            # close waiting on a connection that never finishes (seen here); don't hang shutdown.
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (*_FAILURES, TimeoutError):
                pass

    async def clear(self) -> None:
        keys = [k async for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await self._call("DEL", self.client.delete(*keys[i : i + 500]))

    async def aclose(self) -> None:
        if self._pubsub_client is not None and self._pubsub_client is not self.client:
            await self._pubsub_client.aclose()
        if self._owns_client:
            await self.client.aclose()
