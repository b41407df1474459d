# The public functions of pyproxy._speedups (included by _speedups.pyx only): Python-facing
# wrappers over the cdef parts of fields.pxi, request_id.pxi and rewrite.pxi, which
# _protocol.pyx includes too and calls directly (C calls, no argument parsing).


def validate_name(name):
    """Raise :class:`HeaderError` unless ``name`` is a non-empty RFC 9110 ``token``."""
    cdef Py_ssize_t bad
    if not PyBytes_Check(name):
        raise TypeError(f"header name must be bytes, not {type(name).__name__}")
    bad = _first_bad(_ptr(name), PyBytes_GET_SIZE(name), _TCHAR)
    if bad >= 0 or PyBytes_GET_SIZE(name) == 0:
        raise _ref()._bad_name(name, bad if bad >= 0 else 0)


def validate_value(value, name=b""):
    """Raise :class:`HeaderError` if ``value`` holds NUL, CR, LF or another CTL other than HTAB.

    ``name`` only labels the error.
    """
    cdef Py_ssize_t bad
    if not PyBytes_Check(value) or not PyBytes_Check(name):
        raise TypeError("header name and value must be bytes")
    bad = _first_bad_value(_ptr(value), PyBytes_GET_SIZE(value))
    if bad >= 0:
        raise _ref()._bad_value(name, value, bad)


def validate_headers(headers):
    """Validate every ``(name, value)`` pair in order; raise :class:`HeaderError` on the first bad one."""
    _validate_fields(headers)


def split_list(value):
    """Split a list-based field value into its elements (RFC 9110 §5.6.1).

    Commas inside quoted-strings (with backslash escapes) do not split; OWS around elements is
    stripped and empty elements are dropped.
    """
    if not PyBytes_Check(value):
        raise TypeError(f"value must be bytes, not {type(value).__name__}")
    cdef list out = []
    _split_into(out, value, False)
    return out


def get_first(headers, name):
    """The value of the first header called ``name`` (case-insensitive), or ``None``."""
    _lookup_name(name)
    return _get_first(headers, name)


def get_all(headers, name):
    """The values of every header called ``name`` (case-insensitive), in order."""
    cdef tuple pair
    cdef list out = []
    _lookup_name(name)
    for item in headers:
        pair = _pair(item)
        if _name_is(<object>PyTuple_GET_ITEM(pair, 0), name):
            out.append(<object>PyTuple_GET_ITEM(pair, 1))
    return out


def get_list(headers, name):
    """The list elements (:func:`split_list`) of every header called ``name``, in order."""
    _lookup_name(name)
    return _get_list(headers, name, False)


def connection_tokens(headers):
    """The lower-cased connection options of every ``Connection`` line (``close``, header names ...)."""
    return frozenset(_get_list(headers, b"connection", True))


def reason_phrase(status):
    """The standard reason phrase for ``status`` (``b""`` for codes without one)."""
    return <object>PyList_GET_ITEM(_REASONS, _check_status(status))


def new_request_id():
    """A fresh request id: 32 lowercase hex digits of 16 random bytes (``os.urandom``, batched)."""
    return _new_id()


def serialize_request_head(method, target, headers):
    """``METHOD SP target SP HTTP/1.1 CRLF``, the headers in order and case as given, ``CRLF``.

    Everything is validated first (:class:`HeaderError` names the first problem).
    """
    cdef char stack[STACK_BYTES]
    cdef _Buf out
    cdef tuple pair
    _check_method(method)
    _check_target(target)
    _buf_init(&out, stack, STACK_BYTES)
    try:
        _write_request_line(&out, method, target)
        for item in headers:
            pair = _pair(item)
            name = <object>PyTuple_GET_ITEM(pair, 0)
            value = <object>PyTuple_GET_ITEM(pair, 1)
            _check_field(name, value)
            _put_header(&out, name, value)
        _put(&out, b"\r\n", 2)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        _buf_free(&out)


def serialize_response_head(status, reason, headers):
    """``HTTP/1.1 SP status SP reason CRLF``, the headers in order and case as given, ``CRLF``.

    ``reason=None`` or ``b""`` uses :func:`reason_phrase`.
    """
    cdef char stack[STACK_BYTES]
    cdef _Buf out
    cdef tuple pair
    _buf_init(&out, stack, STACK_BYTES)
    try:
        _write_status_line(&out, status, reason)
        for item in headers:
            pair = _pair(item)
            name = <object>PyTuple_GET_ITEM(pair, 0)
            value = <object>PyTuple_GET_ITEM(pair, 1)
            _check_field(name, value)
            _put_header(&out, name, value)
        _put(&out, b"\r\n", 2)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        _buf_free(&out)


def rewrite_request_head(method, target, headers, *, client, proto=b"http", host=None,
                         via=b"1.1 pyproxy", request_id=None, request_id_header=b"X-Request-ID",
                         upgrade=False, content_length=None, chunked=False, extra=()):
    """Rewrite a received request head for the upstream; return ``(head, request_id)``.

    ``client`` is the peer address appended to ``X-Forwarded-For``; ``proto`` goes to
    ``X-Forwarded-Proto``; ``host`` replaces the Host value; ``via`` is the element appended to
    ``Via`` (``None``: leave Via alone); ``request_id`` replaces the client's id (``None``: keep the
    client's or generate one); ``upgrade=True`` keeps ``Upgrade`` for a tunnel; ``content_length``
    / ``chunked`` choose the framing header; ``extra`` pairs are appended. See
    ``pyproxy.headers`` for the rules.
    """
    return _rewrite_request(method, target, headers, client, proto, host, via, request_id,
                            request_id_header, upgrade, _framing(content_length, chunked), extra, False)


def rewrite_response_head(status, reason, headers, *, via=b"1.1 pyproxy", request_id=None,
                          request_id_header=b"X-Request-ID", drop_server=False, upgrade=False,
                          content_length=None, chunked=False, extra=()):
    """Rewrite an upstream response head for the client; return the serialized head.

    Hop-by-hop removal as for requests; ``via`` appended to ``Via``; the request-id header
    replaced by ``request_id`` when given; ``Server`` removed when ``drop_server``; ``reason``
    ``None``/``b""`` takes the standard phrase; ``content_length`` / ``chunked`` / ``extra`` as for
    :func:`rewrite_request_head`.
    """
    return _rewrite_response(status, reason, headers, via, request_id, request_id_header, drop_server,
                             upgrade, _framing(content_length, chunked), extra, False)
