# Stubs for the Cython module pyproxy._speedups (cython_ext/_speedups.pyx). The public facade is
# pyproxy.headers, which documents the rules; keep these signatures identical to its py_* twins.
from collections.abc import Iterable

def validate_name(name: bytes) -> None: ...
def validate_value(value: bytes, name: bytes = ...) -> None: ...
def validate_headers(headers: Iterable[tuple[bytes, bytes]]) -> None: ...
def split_list(value: bytes) -> list[bytes]: ...
def get_first(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None: ...
def get_all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]: ...
def get_list(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]: ...
def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]: ...
def reason_phrase(status: int) -> bytes: ...
def new_request_id() -> bytes: ...
def serialize_request_head(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> bytes: ...
def serialize_response_head(
    status: int, reason: bytes | None, headers: Iterable[tuple[bytes, bytes]]
) -> bytes: ...
def rewrite_request_head(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: bytes,
    proto: bytes = ...,
    host: bytes | None = ...,
    via: bytes | None = ...,
    request_id: bytes | None = ...,
    request_id_header: bytes = ...,
    upgrade: bool = ...,
    content_length: int | None = ...,
    chunked: bool = ...,
    extra: Iterable[tuple[bytes, bytes]] = ...,
) -> tuple[bytes, bytes]: ...
def rewrite_response_head(
    status: int,
    reason: bytes | None,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    via: bytes | None = ...,
    request_id: bytes | None = ...,
    request_id_header: bytes = ...,
    drop_server: bool = ...,
    upgrade: bool = ...,
    content_length: int | None = ...,
    chunked: bool = ...,
    extra: Iterable[tuple[bytes, bytes]] = ...,
) -> bytes: ...
