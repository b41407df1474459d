# Validation, list splitting and case-insensitive lookups over (name, value) lists.

cdef object _reference = None


cdef object _ref():
    """``pyproxy.headers``: its error constructors word every error (imported on first use)."""
    global _reference
    if _reference is None:
        from pyproxy import headers
        _reference = headers
    return _reference


cdef inline tuple _pair(object item):
    # the readers' lists hold exact 2-tuples; anything else is unpacked like ``n, v = item``.
    if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
        return <tuple>item
    n, v = item
    return (n, v)


cdef inline const unsigned char* _ptr(object b) noexcept:
    return <const unsigned char*>PyBytes_AS_STRING(b)


cdef int _check_field(object name, object value) except -1:
    """RFC 9110 field-name (token) and field-value (no CTL but HTAB) check."""
    if not PyBytes_Check(name) or not PyBytes_Check(value):
        raise _ref()._not_bytes(name, value)
    return _check_span_field(_ptr(name), PyBytes_GET_SIZE(name), _ptr(value), PyBytes_GET_SIZE(value))


cdef int _check_span_field(const unsigned char* name, Py_ssize_t nn, const unsigned char* value,
                           Py_ssize_t nv) except -1:
    """:func:`_check_field` of a field given as spans (its errors' messages made as needed)."""
    cdef Py_ssize_t bad = _first_bad(name, nn, _TCHAR) if nn else 0
    if bad >= 0:
        raise _ref()._bad_name(PyBytes_FromStringAndSize(<const char*>name, nn), bad)
    bad = _first_bad_value(value, nv)
    if bad >= 0:
        raise _ref()._bad_value(PyBytes_FromStringAndSize(<const char*>name, nn),
                                PyBytes_FromStringAndSize(<const char*>value, nv), bad)
    return 0


cdef int _check_method(object method) except -1:
    cdef Py_ssize_t bad
    if not PyBytes_Check(method):
        raise TypeError(f"method must be bytes, not {type(method).__name__}")
    bad = _first_bad(_ptr(method), PyBytes_GET_SIZE(method), _TCHAR)
    if bad >= 0 or PyBytes_GET_SIZE(method) == 0:
        raise _ref()._bad_method(method, bad if bad >= 0 else 0)
    return 0


cdef int _check_target(object target) except -1:
    cdef Py_ssize_t bad
    if not PyBytes_Check(target):
        raise TypeError(f"target must be bytes, not {type(target).__name__}")
    bad = _first_bad(_ptr(target), PyBytes_GET_SIZE(target), _TARGET_OK)
    if bad >= 0 or PyBytes_GET_SIZE(target) == 0:
        raise _ref()._bad_target(target, bad if bad >= 0 else 0)
    return 0


cdef int _check_param(object value, object header, str what) except -1:
    """A caller-supplied header value: bytes, non-empty, valid."""
    cdef Py_ssize_t bad
    if not PyBytes_Check(value):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if PyBytes_GET_SIZE(value) == 0:
        raise ValueError(f"{what} must not be empty")
    bad = _first_bad_value(_ptr(value), PyBytes_GET_SIZE(value))
    if bad >= 0:
        raise _ref()._bad_value(header, value, bad)
    return 0


cdef int _validate_fields(object headers) except -1:
    """Every ``(name, value)`` pair in order (:func:`validate_headers`)."""
    cdef tuple pair
    for item in headers:
        pair = _pair(item)
        _check_field(<object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
    return 0


# --- lists --------------------------------------------------------------------------------------

cdef inline Py_ssize_t _next_element(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos,
                                     Py_ssize_t* start, Py_ssize_t* end) noexcept nogil:
    """One list element of p[:n] from ``pos`` (RFC 9110 §5.6.1): sets the OWS-stripped bounds
    [start, end) (possibly empty) and returns where the next element begins; > n when done.
    Commas inside a quoted-string (backslash escapes included) do not separate."""
    cdef Py_ssize_t i = pos, e
    cdef bint quoted = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if quoted:
            if c == 0x5C:
                i += 2
                continue
            if c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x2C:
            break
        i += 1
    e = i if i < n else n
    while pos < e and (p[pos] == 0x20 or p[pos] == 0x09):
        pos += 1
    while e > pos and (p[e - 1] == 0x20 or p[e - 1] == 0x09):
        e -= 1
    start[0] = pos
    end[0] = e
    return i + 1


cdef int _split_into(list out, object value, bint lower) except -1:
    cdef const unsigned char* p = _ptr(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), pos = 0, s, e, k
    cdef bytes element
    cdef unsigned char* w
    while pos <= n:
        pos = _next_element(p, n, pos, &s, &e)
        if e <= s:
            continue
        if lower:
            # From NULL: always a fresh object. Copying in first could return CPython's shared
            # 1-byte singleton, and lowering that in place would corrupt every b"X" in the process.
            element = PyBytes_FromStringAndSize(NULL, e - s)
            w = <unsigned char*>PyBytes_AS_STRING(element)
            for k in range(e - s):
                w[k] = _LOWER[p[s + k]]
        else:
            element = PyBytes_FromStringAndSize(<const char*>p + s, e - s)
        out.append(element)
    return 0


# --- lookups ------------------------------------------------------------------------------------

cdef inline object _lookup_name(object name):
    if not PyBytes_Check(name):
        raise TypeError(f"name must be bytes, not {type(name).__name__}")
    return name


cdef inline bint _name_is(object n, object name) except -1:
    if not PyBytes_Check(n):
        raise TypeError(f"header names must be bytes, not {type(n).__name__}")
    return (PyBytes_GET_SIZE(n) == PyBytes_GET_SIZE(name)
            and _ieq(_ptr(n), _ptr(name), PyBytes_GET_SIZE(name)))


cdef object _get_first(object headers, object name):
    """:func:`get_first` once ``name`` is known to be bytes."""
    cdef tuple pair
    for item in headers:
        pair = _pair(item)
        if _name_is(<object>PyTuple_GET_ITEM(pair, 0), name):
            return <object>PyTuple_GET_ITEM(pair, 1)
    return None


cdef list _get_list(object headers, object name, bint lower):
    cdef tuple pair
    cdef list out = []
    for item in headers:
        pair = _pair(item)
        if _name_is(<object>PyTuple_GET_ITEM(pair, 0), name):
            value = <object>PyTuple_GET_ITEM(pair, 1)
            if not PyBytes_Check(value):
                raise TypeError(f"value must be bytes, not {type(value).__name__}")
            _split_into(out, value, lower)
    return out


# --- reason phrases -----------------------------------------------------------------------------

cdef list _REASONS = [b""] * 1000
for _status in _HTTPStatus:
    _REASONS[_status.value] = _status.phrase.encode("ascii")
del _status


cdef int _check_status(object status) except -1:
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be int, not {type(status).__name__}")
    if not 100 <= status <= 999:
        raise ValueError(f"status must be a 3-digit code, got {status}")
    return <int>status
