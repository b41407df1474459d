"""Compression of cached values for the tiers that pay per byte (L2 Redis, L3 a database).

zstd by default (best ratio per CPU-microsecond at low levels), lz4 as the faster option; only values
of at least ``min_size`` bytes are compressed (below that the frame overhead and the call cost more
than they save), and a value that does not shrink is stored as it is. Each record says which codec
its payload used (``entry.py``), so changing the setting never makes old records unreadable.

``lz4`` uses the block format without a size prefix: the record already holds the raw length, which
also bounds decompression (a damaged length cannot make us allocate more than the record claims).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lz4.block
import zstandard

from pyproxy.errors import CorruptEntry

__all__ = ["CODECS", "Compressor", "decompress"]

CodecName = Literal["none", "zstd", "lz4"]
# Codec ids as written in records: never renumber.
CODECS: dict[str, int] = {"none": 0, "zstd": 1, "lz4": 2}
ZSTD_LEVELS = range(-7, 23)
LZ4_LEVELS = range(0, 17)  # 0: the fast default mode; 1..16: high-compression mode


@dataclass
class CompressionStats:
    """Bytes given to :meth:`Compressor.compress` and bytes it returned (the ratio metric)."""

    raw_bytes: int = 0
    stored_bytes: int = 0
    compressed: int = 0
    skipped: int = 0

    @property
    def ratio(self) -> float:
        """Raw / stored over everything seen (1.0 before anything was stored)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


class Compressor:
    """Compresses values with one codec, level and size threshold; counts what it saved."""

    def __init__(self, codec: CodecName = "zstd", *, level: int | None = None, min_size: int = 1024) -> None:
        if codec not in CODECS:
            raise ValueError(f"compression codec must be one of {sorted(CODECS)}, got {codec!r}")
        if min_size < 0:
            raise ValueError(f"compression min_size must be >= 0, got {min_size}")
        self.codec: CodecName = codec
        self.min_size = min_size
        self.stats = CompressionStats()
        self._zstd: zstandard.ZstdCompressor | None = None
        if codec == "zstd":
            self.level = 3 if level is None else level
            if self.level not in ZSTD_LEVELS:
                raise ValueError(f"zstd level must be in -7..22, got {self.level}")
            self._zstd = zstandard.ZstdCompressor(level=self.level)
        elif codec == "lz4":
            self.level = 0 if level is None else level
            if self.level not in LZ4_LEVELS:
                raise ValueError(f"lz4 level must be in 0..16, got {self.level}")
        else:
            self.level = 0

    def compress(self, value: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """``(codec id, payload)``: the value compressed, or as it is (codec 0) when it is below
        ``min_size``, the codec is ``none``, or compressing did not make it smaller."""
        n = len(value)
        self.stats.raw_bytes += n
        if self.codec == "none" or n < self.min_size:
            self.stats.skipped += 1
            self.stats.stored_bytes += n
            return 0, value
        if self._zstd is not None:
            packed = self._zstd.compress(value)
        elif self.level:
            packed = lz4.block.compress(value, mode="high_compression", compression=self.level, store_size=False)
        else:
            packed = lz4.block.compress(value, store_size=False)
        if len(packed) >= n:
            self.stats.skipped += 1
            self.stats.stored_bytes += n
            return 0, value
        self.stats.compressed += 1
        self.stats.stored_bytes += len(packed)
        return CODECS[self.codec], packed


_zstd_reader = zstandard.ZstdDecompressor()


def decompress(codec: int, payload: bytes | memoryview, raw_len: int) -> bytes:
    """The value a record's payload holds; :class:`CorruptEntry` if it does not decompress to
    ``raw_len`` bytes or the codec is unknown."""
    try:
        if codec == 1:
            value = _zstd_reader.decompress(payload, max_output_size=raw_len)
        elif codec == 2:
            value = lz4.block.decompress(payload, uncompressed_size=raw_len)
        else:
            raise CorruptEntry(f"cache record uses unknown codec id {codec}")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as e:
        raise CorruptEntry(f"cache record payload does not decompress: {e}") from None
    if len(value) != raw_len:
        raise CorruptEntry(f"cache record value is {len(value)} bytes, its header says {raw_len}")
    return value
