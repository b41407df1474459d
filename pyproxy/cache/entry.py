"""Cache entries and their stored form: a versioned, compact binary record with a checksum.

An entry is a value (the bytes the user stores: for HTTP, the body) with a little metadata the cache
needs itself: when it was stored and when it stops being fresh, its tags (for purging), and an opaque
``meta`` blob for the layer above (the HTTP cache keeps the status line and headers there).

Stored form, little-endian (``encode`` / ``decode``)::

    magic    b"PXC"            3 bytes: not ours otherwise
    version  u8                FORMAT_VERSION; other versions are refused, not guessed at
    codec    u8                how ``payload`` is compressed (compression.Codec ids; 0 = none)
    flags    u8                reserved, 0
    stored   f64               Unix time the entry was stored
    expires  f64               Unix time it expires, 0 = never
    ntags    u16, then ntags × (u16 length, UTF-8 tag)
    meta     u32 length, bytes
    raw_len  u32               length of the value before compression
    payload  the (compressed) value, to 4 bytes before the end
    crc32    u32               zlib.crc32 of every byte before it

A record that is truncated, has the wrong magic, version or checksum, or whose payload does not
decompress to ``raw_len`` bytes raises :class:`~pyproxy.errors.CorruptEntry`. Memory (L1) holds
records it made itself and skips the checksum on read (``verify=False``): checking 64 KiB would cost
more than the whole lookup, and memory does not rot the way a shared Redis or a database file can.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass, field

from pyproxy.cache.compression import Compressor, decompress
from pyproxy.errors import CorruptEntry

__all__ = ["FORMAT_VERSION", "CacheEntry", "decode", "encode"]

MAGIC = b"PXC"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<3sBBBdd")  # magic, version, codec, flags, stored, expires
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CRC = struct.Struct("<I")
MAX_TAGS = 1024
MAX_TAG_BYTES = 1024


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached value with what the cache keeps beside it.

    ``value`` may be a ``memoryview`` into the stored record (reads from memory do not copy);
    ``bytes(entry.value)`` makes it independent.
    """

    value: bytes | memoryview
    stored_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    tags: tuple[str, ...] = ()
    meta: bytes = b""

    def ttl(self, now: float | None = None) -> float | None:
        """Seconds until it expires (may be <= 0 once expired); ``None`` if it never does."""
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        remaining = self.ttl(now)
        return remaining is not None and remaining <= 0


def encode(entry: CacheEntry, compressor: Compressor | None = None) -> bytes:
    """The stored form of ``entry``; its value compressed by ``compressor`` when it decides to."""
    value = entry.value
    codec, payload = (0, value) if compressor is None else compressor.compress(value)
    if len(entry.tags) > MAX_TAGS:
        raise ValueError(f"an entry may carry at most {MAX_TAGS} tags, got {len(entry.tags)}")
    parts: list[bytes | memoryview] = [
        _HEAD.pack(MAGIC, FORMAT_VERSION, codec, 0, entry.stored_at, entry.expires_at or 0.0),
        _U16.pack(len(entry.tags)),
    ]
    for tag in entry.tags:
        raw = tag.encode()
        if not raw or len(raw) > MAX_TAG_BYTES:
            raise ValueError(f"a tag must be 1..{MAX_TAG_BYTES} bytes of UTF-8, got {len(raw)}: {tag[:40]!r}")
        parts += (_U16.pack(len(raw)), raw)
    parts += (_U32.pack(len(entry.meta)), entry.meta, _U32.pack(len(value)), payload)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return b"".join(parts)  # one copy of the value, not two


def decode(record: bytes | memoryview, *, verify: bool = True) -> CacheEntry:
    """The entry stored as ``record``; :class:`CorruptEntry` if it is not an intact one of ours.

    ``verify=False`` skips the checksum (for records the caller made and kept in memory); the value
    is then a ``memoryview`` into ``record`` when it was stored uncompressed, so nothing is copied.
    """
    view = memoryview(record)
    size = len(view)
    if size < _HEAD.size + _U16.size + 2 * _U32.size + _CRC.size:
        raise CorruptEntry(f"cache record of {size} bytes is shorter than any entry")
    magic, version, codec, _flags, stored, expires = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry("not a pyproxy cache record (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"cache record format version {version}, this build reads {FORMAT_VERSION}")
    body_end = size - _CRC.size
    if verify and zlib.crc32(view[:body_end]) != _CRC.unpack_from(view, body_end)[0]:
        raise CorruptEntry("cache record checksum mismatch")
    try:
        at = _HEAD.size
        (ntags,) = _U16.unpack_from(view, at)
        at += _U16.size
        tags = []
        for _ in range(ntags):
            (n,) = _U16.unpack_from(view, at)
            at += _U16.size
            tags.append(str(view[at : at + n], "utf-8"))
            at += n
        (meta_len,) = _U32.unpack_from(view, at)
        at += _U32.size
        meta = bytes(view[at : at + meta_len])
        at += meta_len
        (raw_len,) = _U32.unpack_from(view, at)
        at += _U32.size
    except (struct.error, UnicodeDecodeError) as e:
        raise CorruptEntry(f"cache record header is damaged: {e}") from None
    if at > body_end:
        raise CorruptEntry("cache record is truncated")
    payload = view[at:body_end]
    value: bytes | memoryview = payload if codec == 0 else decompress(codec, payload, raw_len)
    if len(value) != raw_len:
        raise CorruptEntry(f"cache record value is {len(value)} bytes, its header says {raw_len}")
    return CacheEntry(value, stored, expires or None, tuple(tags), meta)
