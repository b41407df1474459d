"""Cache tiers: get latency per tier and entry size, and compression ratio / cost, in one run.

    python bench/cache_tiers.py [--rounds 5] [--gets 400]

Starts a real ``redis-server``, a 3-master Redis Cluster and a PostgreSQL server on free 127.0.0.1
ports (``tests/services.py``; Debian packages ``redis-server`` and ``postgresql``), and an SQLite file
in a temporary folder; everything started is stopped by its PID afterwards. For 1 KiB and 64 KiB
entries (JSON-like text, as an agent's answer), it times ``TieredCache.lookup`` on a cache of one
tier — so decoding and, for the remote tiers, the checksum and decompression are included — for
L1 memory, L2 Redis (single server, and Cluster), L3 SQLite and L3 PostgreSQL, alternating the tiers
round by round, and prints p50 and p99 in µs with the issue's targets (L1 <= 5 µs; L2 p99 <= 1 ms;
SQLite p99 <= 2 ms; PostgreSQL p99 <= 3 ms). Then compression: ratio and µs per compress and
decompress of the 64 KiB entry for zstd (levels 1, 3, 9) and lz4 (fast, and level 9). Last, cache
hits through the proxy against nginx ``proxy_cache`` hits (``bench/proxy_load.py --cache``, requests
per proxy CPU-second, target >= 1.0x nginx): ``--proxy-rounds 0`` leaves them out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from services import PostgresServer, RedisCluster, RedisServer  # noqa: E402

from ratio import percentile  # noqa: E402

from pyproxy.cache import Compressor, MemoryTier, RedisTier, SqlTier, TieredCache  # noqa: E402
from pyproxy.cache.compression import decompress  # noqa: E402
from pyproxy.loop import new_event_loop  # noqa: E402

TARGET_P99_US = {"memory": 5.0, "redis": 1000.0, "redis-cluster": 1000.0, "sqlite": 2000.0, "postgres": 3000.0}


def payload(size: int) -> bytes:
    """JSON-like text of about ``size`` bytes (compressible as real answers are, not trivially)."""
    items, n = [], 0
    while n < size:
        item = {"id": n, "title": f"Document {n * 7919 % 10007}", "score": (n * 37 % 101) / 100, "tags": ["agent", "summary", str(n % 13)]}
        items.append(item)
        n = len(json.dumps(items))
    return json.dumps(items).encode()[:size]


async def time_gets(cache: TieredCache, key: str, gets: int) -> list[float]:
    out = []
    lookup = cache.lookup
    for _ in range(gets):
        t = time.perf_counter()
        hit = await lookup(key)
        out.append(time.perf_counter() - t)
        assert hit is not None
    return out


async def tiers_run(redis: RedisServer, cluster: RedisCluster, dsn: str, folder: Path, rounds: int, gets: int) -> None:
    def make(name: str) -> TieredCache:
        tier = {
            "memory": lambda: MemoryTier(),
            "redis": lambda: RedisTier.from_url(redis.url),
            "redis-cluster": lambda: RedisTier.from_url(cluster.url, cluster=True),
            "sqlite": lambda: SqlTier.sqlite(folder / "bench.sqlite3"),
            "postgres": lambda: SqlTier.postgres(dsn),
        }[name]()
        tier.name = name  # type: ignore[misc]  # distinct names in the report
        return TieredCache([tier], timeout=5)

    names = list(TARGET_P99_US)
    caches = {n: await make(n).start() for n in names}
    samples: dict[tuple[str, int], list[float]] = {}
    for size in (1024, 65536):
        value = payload(size)
        key = f"bench:{size}"
        for cache in caches.values():
            await cache.set(key, value, ttl=3600)
            await time_gets(cache, key, 50)  # warm: connections, statements, caches
        for _ in range(rounds):
            for name in names:
                samples.setdefault((name, size), []).extend(await time_gets(caches[name], key, gets))
    for cache in caches.values():
        await cache.aclose()

    print(f"\ncache tier get latency ({rounds} alternated rounds x {gets} gets; TieredCache.lookup on one tier)")
    print(f"  {'tier':<14} {'size':>6} {'p50 µs':>9} {'p99 µs':>9} {'target p99':>11}  ok")
    for (name, size), s in samples.items():
        p50, p99 = percentile(s, 0.5) * 1e6, percentile(s, 0.99) * 1e6
        target = TARGET_P99_US[name]
        print(f"  {name:<14} {size // 1024:>4} K {p50:>9.1f} {p99:>9.1f} {target:>9.0f} µs  {'yes' if p99 <= target else 'NO'}")


def compression_run(rounds: int) -> None:
    value = payload(65536)
    print("\ncompression of a 64 KiB JSON-like entry (median of rounds)")
    print(f"  {'codec':<10} {'ratio':>6} {'compress µs':>12} {'decompress µs':>14}")
    for codec, level in (("zstd", 1), ("zstd", 3), ("zstd", 9), ("lz4", 0), ("lz4", 9)):
        c = Compressor(codec, level=level, min_size=0)  # type: ignore[arg-type]
        comp, decomp = [], []
        packed: bytes | memoryview = b""
        for _ in range(rounds * 20):
            t = time.perf_counter()
            codec_id, packed = c.compress(value)
            comp.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert decompress(codec_id, packed, len(value)) == value
            decomp.append(time.perf_counter() - t)
        name = f"{codec}-{level}" if level else codec
        print(f"  {name:<10} {len(value) / len(packed):>6.2f} {statistics.median(comp) * 1e6:>12.1f} {statistics.median(decomp) * 1e6:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gets", type=int, default=400)
    parser.add_argument("--proxy-rounds", type=int, default=3, help="rounds of proxy cache hits vs nginx (0: none)")
    parser.add_argument("--proxy-duration", type=int, default=5, help="seconds per wrk run of those rounds")
    args = parser.parse_args()
    with RedisServer() as redis, RedisCluster(masters=3) as cluster, PostgresServer() as pg, tempfile.TemporaryDirectory() as d:
        dsn = pg.create_database("bench_cache")
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(tiers_run(redis, cluster, dsn, Path(d), args.rounds, args.gets))
    compression_run(args.rounds)
    if args.proxy_rounds > 0:
        print("\ncache hits through the proxy vs nginx proxy_cache (bench/proxy_load.py --cache)", flush=True)
        script = Path(__file__).resolve().parent / "proxy_load.py"
        subprocess.run(
            [sys.executable, str(script), "--cache", "--rounds", str(args.proxy_rounds), "--duration", str(args.proxy_duration)],
            check=True,
        )


if __name__ == "__main__":
    main()
