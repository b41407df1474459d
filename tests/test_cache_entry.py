"""The stored form of cache entries (pyproxy/cache/entry.py) and compression (compression.py)."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxy.cache import CacheEntry, Compressor, decode, encode
from pyproxy.errors import CorruptEntry

TEXT = b"The quick brown fox jumps over the lazy dog. " * 200  # compressible, 9000 bytes


@given(
    value=st.binary(max_size=3000),
    tags=st.lists(st.text(min_size=1, max_size=20), max_size=5),
    meta=st.binary(max_size=200),
    expires=st.none() | st.floats(1e9, 3e9),
    codec=st.sampled_from(["none", "zstd", "lz4"]),
)
def test_roundtrip_every_codec(value: bytes, tags: list[str], meta: bytes, expires: float | None, codec: str) -> None:
    entry = CacheEntry(value, 1_700_000_000.5, expires, tuple(tags), meta)
    got = decode(encode(entry, Compressor(codec, min_size=0)))  # type: ignore[arg-type]
    assert bytes(got.value) == value
    assert (got.stored_at, got.expires_at, got.tags, got.meta) == (1_700_000_000.5, expires, tuple(tags), meta)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compression_shrinks_text_and_counts_the_ratio(codec: str) -> None:
    c = Compressor(codec, min_size=1024)  # type: ignore[arg-type]
    record = encode(CacheEntry(TEXT), c)
    assert len(record) < len(TEXT) / 10
    assert record[4] != 0, "the codec byte names the compression"
    assert c.stats.compressed == 1 and c.stats.ratio > 10
    # Below the threshold, and incompressible data: stored as they are.
    small = encode(CacheEntry(b"x" * 100), c)
    noise = encode(CacheEntry(os.urandom(4096)), c)
    assert small[4] == 0 and noise[4] == 0
    assert c.stats.skipped == 2


def test_levels_are_validated() -> None:
    with pytest.raises(ValueError, match="zstd level"):
        Compressor("zstd", level=99)
    with pytest.raises(ValueError, match="lz4 level"):
        Compressor("lz4", level=17)
    with pytest.raises(ValueError, match="codec"):
        Compressor("brotli")  # type: ignore[arg-type]
    assert decode(encode(CacheEntry(TEXT), Compressor("lz4", level=9))).value == TEXT


def _corruptions(record: bytes) -> dict[str, bytes]:
    body = record[:-4]
    flipped = bytearray(record)
    flipped[len(record) // 2] ^= 0x40
    future = bytearray(body)
    future[3] = 99  # version
    return {
        "bit flip": bytes(flipped),
        "truncated": record[: len(record) - 10],
        "empty": b"",
        "foreign": b"hello world, not a cache record at all" * 3,
        "other version": bytes(future) + struct.pack("<I", zlib.crc32(bytes(future))),
    }


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_corrupt_records_are_refused(codec: str) -> None:
    record = encode(CacheEntry(TEXT, tags=("a",)), Compressor(codec))  # type: ignore[arg-type]
    for what, bad in _corruptions(record).items():
        with pytest.raises(CorruptEntry):
            decode(bad)
        assert what


def test_a_payload_that_lies_about_its_length_is_refused_even_with_a_valid_checksum() -> None:
    record = encode(CacheEntry(TEXT), Compressor("zstd"))
    body = bytearray(record[:-4])
    # raw_len sits just before the payload: claim one byte more than the value has.
    at = body.index(struct.pack("<I", len(TEXT)))
    body[at : at + 4] = struct.pack("<I", len(TEXT) + 1)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(CorruptEntry, match="decompress|bytes"):
        decode(forged)


def test_unverified_decode_does_not_copy_the_value() -> None:
    record = encode(CacheEntry(b"v" * 1000))
    got = decode(record, verify=False)
    assert isinstance(got.value, memoryview) and got.value.obj is record


def test_bad_tags_are_value_errors() -> None:
    with pytest.raises(ValueError, match="tag"):
        encode(CacheEntry(b"v", tags=("",)))
    with pytest.raises(ValueError, match="tags"):
        encode(CacheEntry(b"v", tags=tuple(str(i) for i in range(2000))))
