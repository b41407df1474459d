"""Purges through the admin API (``POST /cache/purge``): by URL, by key or by tag, everywhere.

What must drop the purged entries: the tiers every process shares (Redis, PostgreSQL, an SQLite file
the machine's workers share) — purged once, by the process serving the admin API, which also
publishes the purge on Redis for the other instances (``tiered.py``) — and each worker's own memory.
A single-process proxy purges its own tiers directly. A supervisor cannot reach its workers' memory,
so it appends the purge (keys, and tags with their dependencies already expanded) to a file made
before forking and signals the workers (``SIGUSR1``, as for pool changes); each worker applies the
records it has not applied yet to its memory tier. Records are JSON lines ``{"seq", "keys", "tags"}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pyproxy.cache.http import CachePolicy, primary_key
from pyproxy.cache.phase import policy_of
from pyproxy.config import Config
from pyproxy.routing import Router

__all__ = ["PurgeRecord", "append_purge", "keys_for_urls", "read_purges"]

log = logging.getLogger("pyproxy.cache")


@dataclass(frozen=True, slots=True)
class PurgeRecord:
    seq: int
    keys: tuple[str, ...]
    tags: tuple[str, ...]


def append_purge(path: Path, record: PurgeRecord) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"seq": record.seq, "keys": list(record.keys), "tags": list(record.tags)}) + "\n")


def read_purges(path: Path, after: int) -> list[PurgeRecord]:
    """Records numbered above ``after`` (a line cut short by a concurrent append is left for the
    next read)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if raw.get("seq", 0) > after:
            out.append(PurgeRecord(int(raw["seq"]), tuple(raw.get("keys", ())), tuple(raw.get("tags", ()))))
    return out


def keys_for_urls(urls: Iterable[str], config: Config) -> list[str]:
    """The cache key of each absolute URL (``http://host/path?query``), normalised as the route
    that serves it says; ``ValueError`` naming the first URL that is not absolute."""
    router = Router(config.routes)
    keys = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an absolute http(s) URL, got {url!r}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        route = router.match("GET", target, parts.netloc)
        policy = policy_of(route.cache) if route is not None else CachePolicy()
        keys.append(primary_key(parts.scheme, parts.netloc.encode(), target.encode(), policy))
    return keys


def plain_strings(value: object, what: str) -> Sequence[str]:
    """A JSON list of non-empty strings (or one string), else ``ValueError``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a string or a list of non-empty strings")
    return value
