# Serialization and the forwarding rewrites. Two passes over the header list: the first
# validates, classifies and collects the Connection options (which may name a header that came
# earlier); the second writes what is kept, then the generated headers, into one buffer.

cdef enum:  # what the writing pass does with a received line
    A_DROP = 0
    A_KEEP = 1         # kept; Connection cannot remove it
    A_KEEP_NAMED = 2   # kept unless a Connection option names it
    A_HOST = 3         # kept in place, value replaced when the caller gives one
    A_XFF = 4          # elements folded into our X-Forwarded-For
    A_VIA = 5          # value folded into our Via

cdef enum:
    FRAMING_CHUNKED = -1
    FRAMING_NONE = -2


cdef long long _framing(object content_length, bint chunked) except -3:
    if content_length is None:
        return FRAMING_CHUNKED if chunked else FRAMING_NONE
    if not isinstance(content_length, int) or isinstance(content_length, bool):
        raise TypeError(
            f"content_length must be int or None, not {type(content_length).__name__}")
    if chunked:
        raise ValueError("content_length and chunked are mutually exclusive")
    if content_length < 0 or content_length > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"content_length out of range: {content_length}")
    return <long long>content_length


cdef int _check_rid_header(object request_id_header) except -1:
    cdef Py_ssize_t bad
    if not PyBytes_Check(request_id_header):
        raise TypeError(
            f"request_id_header must be bytes, not {type(request_id_header).__name__}")
    bad = _first_bad(_ptr(request_id_header), PyBytes_GET_SIZE(request_id_header), _TCHAR)
    if bad >= 0 or PyBytes_GET_SIZE(request_id_header) == 0:
        raise _ref()._bad_name(request_id_header, bad if bad >= 0 else 0)
    return 0


cdef int _check_request_params(object client, object proto, object host, object via,
                               object request_id, object request_id_header) except -1:
    """The values a request rewrite adds, as a caller gives them."""
    _check_param(client, b"X-Forwarded-For", "client")
    _check_param(proto, b"X-Forwarded-Proto", "proto")
    if host is not None:
        _check_param(host, b"Host", "host")
    return _check_response_params(via, request_id, request_id_header)


cdef int _check_response_params(object via, object request_id, object request_id_header) except -1:
    """The values a response rewrite adds, as a caller gives them."""
    if via is not None:
        _check_param(via, b"Via", "via")
    _check_rid_header(request_id_header)
    if request_id is not None:
        _check_param(request_id, request_id_header, "request_id")
    return 0


cdef list _as_pairs(object headers):
    """The headers as a list of exact 2-tuples (the input itself in the usual case)."""
    cdef list hl = headers if type(headers) is list else list(headers)
    cdef Py_ssize_t i
    for i in range(PyList_GET_SIZE(hl)):
        item = <object>PyList_GET_ITEM(hl, i)
        if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
            return [_pair(x) for x in hl]
    return hl


cdef Py_ssize_t _list_fields(list hl, _Spans* f) except -1:
    """The fields of ``hl`` (exact 2-tuples) as name, value spans into its bytes (valid while
    ``hl`` and its tuples are): the rewrite works on spans, so a head read into spans needs no
    list. Stops at the first field that is not two bytes; returns how many it took."""
    cdef Py_ssize_t i
    for i in range(PyList_GET_SIZE(hl)):
        item = <object>PyList_GET_ITEM(hl, i)
        name = <object>PyTuple_GET_ITEM(item, 0)
        value = <object>PyTuple_GET_ITEM(item, 1)
        if not PyBytes_Check(name) or not PyBytes_Check(value):
            return i
        _spans_push(f, _ptr(name), PyBytes_GET_SIZE(name))
        _spans_push(f, _ptr(value), PyBytes_GET_SIZE(value))
    return PyList_GET_SIZE(hl)


cdef list _own_fields(list hl, object extra):
    """``hl``, or a copy of it when ``extra`` might run Python code as it is read (iterating
    or unpacking objects of the caller's), which could empty the caller's list and free the
    bytes the spans point into."""
    if type(extra) is tuple or type(extra) is list:
        for item in extra:
            if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
                return list(hl)
        return hl
    return list(hl)


cdef int _not_bytes_after(const _Span* f, Py_ssize_t k, list hl, bint is_request, bint manage_via,
                          bint rid_given, object rid_header, bint upgrade, bint drop_server,
                          bint checked) except -1:
    """Field ``k`` of ``hl`` is not two bytes: raise what checking the fields in order raises
    (an error of a field before it first)."""
    cdef unsigned char act_stack[128]
    cdef _Span token_stack[16]
    cdef _Buf act
    cdef _Spans tokens
    cdef _Scan st
    _buf_init(&act, <char*>act_stack, 128)
    _spans_init(&tokens, token_stack, 16)
    try:
        if k > act.cap:
            _buf_grow(&act, k)
        _scan(f, k, <unsigned char*>act.data, &tokens, &st, is_request, manage_via, rid_given,
              rid_header, upgrade, drop_server, checked)
    finally:
        _buf_free(&act)
        _spans_free(&tokens)
    item = <object>PyList_GET_ITEM(hl, k)
    raise _ref()._not_bytes(<object>PyTuple_GET_ITEM(item, 0), <object>PyTuple_GET_ITEM(item, 1))


cdef struct _Scan:
    Py_ssize_t host      # index of the Host line, -1 if none
    Py_ssize_t rid       # index of the client's request-id line (request, not replaced), -1
    bint tunnel          # an Upgrade line is kept


cdef int _scan(const _Span* f, Py_ssize_t count, unsigned char* act, _Spans* tokens, _Scan* st,
               bint is_request, bint manage_via, bint rid_given, object rid_header, bint upgrade,
               bint drop_server, bint checked) except -1:
    """Pass 1: validate every field (``f``: name, value spans) in order, decide its fate,
    collect Connection options."""
    cdef Py_ssize_t i, nn, nv, s, e, pos
    cdef Py_ssize_t rn = PyBytes_GET_SIZE(rid_header)
    cdef const unsigned char* np
    cdef const unsigned char* vp
    cdef int cls
    cdef unsigned char a
    st.host = -1
    st.rid = -1
    st.tunnel = False
    for i in range(count):
        np = f[2 * i].p
        nn = f[2 * i].n
        vp = f[2 * i + 1].p
        nv = f[2 * i + 1].n
        if not checked:
            _check_span_field(np, nn, vp, nv)
        if nn == rn and _ieq(np, _ptr(rid_header), nn):
            cls = H_RID
        else:
            cls = _classify(np, nn)
        if cls == H_OTHER:
            a = A_KEEP_NAMED
        elif cls == H_HOP:
            a = A_DROP
        elif cls == H_CONNECTION:
            a = A_DROP
            pos = 0
            while pos <= nv:
                pos = _next_element(vp, nv, pos, &s, &e)
                if e > s:
                    _spans_push(tokens, vp + s, e - s)
        elif cls == H_UPGRADE:
            if upgrade:
                st.tunnel = True
                a = A_KEEP
            else:
                a = A_DROP
        elif cls == H_VIA:
            a = A_VIA if manage_via else A_KEEP
        elif cls == H_SERVER:
            a = A_DROP if drop_server and not is_request else A_KEEP_NAMED
        elif not is_request:
            if cls == H_RID:
                a = A_DROP if rid_given else A_KEEP
            else:  # Host, Forwarded, X-Forwarded-*: not ours to manage in a response
                a = A_KEEP
        elif cls == H_HOST:
            if st.host >= 0:
                raise _ref()._multiple_host()
            st.host = i
            a = A_HOST
        elif cls == H_XFF:
            a = A_XFF
        elif cls == H_XFWD:
            a = A_DROP
        elif cls == H_RID:
            a = A_DROP
            if not rid_given and st.rid < 0:
                s = 0
                e = nv
                while s < e and (vp[s] == 0x20 or vp[s] == 0x09):
                    s += 1
                while e > s and (vp[e - 1] == 0x20 or vp[e - 1] == 0x09):
                    e -= 1
                if e > s:
                    st.rid = i
        else:  # Forwarded
            a = A_KEEP
        act[i] = a
    return 0


cdef inline bint _named(const unsigned char* p, Py_ssize_t n, _Spans* tokens) noexcept:
    cdef Py_ssize_t k
    for k in range(tokens.size):
        if tokens.items[k].n == n and _ieq(p, tokens.items[k].p, n):
            return True
    return False


cdef list _check_extra(object extra):
    cdef list pairs = []
    cdef tuple pair
    for item in extra:
        pair = _pair(item)
        _check_field(<object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
        pairs.append(pair)
    return pairs


cdef int _write_kept(_Buf* out, const _Span* f, Py_ssize_t count, unsigned char* act,
                     _Spans* tokens, object host) except -1:
    """Pass 2, the received lines that stay, in order."""
    cdef Py_ssize_t i
    cdef unsigned char a
    for i in range(count):
        a = act[i]
        if a == A_DROP or a == A_XFF or a == A_VIA:
            continue
        if a == A_KEEP_NAMED and tokens.size and _named(f[2 * i].p, f[2 * i].n, tokens):
            continue
        if a == A_HOST and host is not None:
            _put_field(out, f[2 * i].p, f[2 * i].n, _ptr(host), PyBytes_GET_SIZE(host))
        else:
            _put_field(out, f[2 * i].p, f[2 * i].n, f[2 * i + 1].p, f[2 * i + 1].n)
    return 0


cdef int _write_via(_Buf* out, const _Span* f, Py_ssize_t count, unsigned char* act,
                    object via) except -1:
    """``Via:`` the received values (OWS-stripped, empty ones skipped), then ours."""
    cdef Py_ssize_t i, s, e
    cdef const unsigned char* vp
    _put(out, b"Via: ", 5)
    for i in range(count):
        if act[i] != A_VIA:
            continue
        vp = f[2 * i + 1].p
        s = 0
        e = f[2 * i + 1].n
        while s < e and (vp[s] == 0x20 or vp[s] == 0x09):
            s += 1
        while e > s and (vp[e - 1] == 0x20 or vp[e - 1] == 0x09):
            e -= 1
        if e > s:
            _put(out, <const char*>vp + s, e - s)
            _put(out, b", ", 2)
    _put_bytes(out, via)
    _put(out, b"\r\n", 2)
    return 0


cdef int _write_tail(_Buf* out, list extra, bint tunnel, long long framing) except -1:
    cdef tuple pair
    for pair in extra:
        _put_header(out, <object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
    if tunnel:
        _put(out, b"Connection: upgrade\r\n", 21)
    if framing >= 0:
        _put(out, b"Content-Length: ", 16)
        _put_uint(out, <unsigned long long>framing)
        _put(out, b"\r\n", 2)
    elif framing == FRAMING_CHUNKED:
        _put(out, b"Transfer-Encoding: chunked\r\n", 28)
    _put(out, b"\r\n", 2)
    return 0


cdef int _write_status_line(_Buf* out, object status, object reason) except -1:
    cdef int code = _check_status(status)
    cdef Py_ssize_t bad
    cdef char digits[3]
    if reason is None or (PyBytes_Check(reason) and PyBytes_GET_SIZE(reason) == 0):
        reason = <object>PyList_GET_ITEM(_REASONS, code)
    elif not PyBytes_Check(reason):
        raise TypeError(f"reason must be bytes or None, not {type(reason).__name__}")
    else:
        bad = _first_bad_value(_ptr(reason), PyBytes_GET_SIZE(reason))
        if bad >= 0:
            raise _ref()._bad_reason(reason, bad)
    digits[0] = <char>(c'0' + code // 100)
    digits[1] = <char>(c'0' + code // 10 % 10)
    digits[2] = <char>(c'0' + code % 10)
    _put(out, b"HTTP/1.1 ", 9)
    _put(out, digits, 3)
    _put(out, b" ", 1)
    _put_bytes(out, reason)
    _put(out, b"\r\n", 2)
    return 0


cdef inline int _write_request_line(_Buf* out, object method, object target) except -1:
    _put_bytes(out, method)
    _put(out, b" ", 1)
    _put_bytes(out, target)
    _put(out, b" HTTP/1.1\r\n", 11)
    return 0


cdef tuple _rewrite_request(object method, object target, object headers, object client, object proto,
                            object host, object via, object request_id, object request_id_header,
                            object upgrade, long long framing, object extra, bint checked,
                            bint check_params=True):
    """:func:`rewrite_request_head` with its arguments decided (``framing`` from ``_framing``);
    ``checked``: every field of ``headers`` already passed ``_check_field`` (a head the data plane
    validated on arrival is not checked twice). ``check_params=False``: the values added (client,
    proto, host, via, request id) are known good (the data plane's: constants, or checked where they
    arise)."""
    cdef char stack[STACK_BYTES]
    cdef unsigned char act_stack[128]
    cdef _Span token_stack[16]
    cdef _Span field_stack[64]
    cdef _Buf out
    cdef _Buf act
    cdef _Spans tokens
    cdef _Spans fields
    cdef _Scan st
    cdef list hl, extra_pairs
    cdef Py_ssize_t i, n, pos, s, e
    cdef const _Span* f
    cdef const unsigned char* vp
    _check_method(method)
    _check_target(target)
    if check_params:
        _check_request_params(client, proto, host, via, request_id, request_id_header)
    hl = _own_fields(_as_pairs(headers), extra)
    n = PyList_GET_SIZE(hl)
    _buf_init(&out, stack, STACK_BYTES)
    _buf_init(&act, <char*>act_stack, 128)
    _spans_init(&tokens, token_stack, 16)
    _spans_init(&fields, field_stack, 64)
    try:
        i = _list_fields(hl, &fields)
        f = fields.items
        if i < n:
            _not_bytes_after(f, i, hl, True, via is not None, request_id is not None,
                             request_id_header, upgrade, False, checked)
        if n > act.cap:
            _buf_grow(&act, n)
        _scan(f, n, <unsigned char*>act.data, &tokens, &st, True, via is not None,
              request_id is not None, request_id_header, upgrade, False, checked)
        extra_pairs = _check_extra(extra)
        if st.host < 0 and host is None:
            raise _ref()._missing_host()

        _write_request_line(&out, method, target)
        if st.host < 0:
            _put_header(&out, b"Host", host)
        _write_kept(&out, f, n, <unsigned char*>act.data, &tokens, host)
        # X-Forwarded-For: every received element, in order, then the client.
        _put(&out, b"X-Forwarded-For: ", 17)
        for i in range(n):
            if <unsigned char>act.data[i] != A_XFF:
                continue
            vp = f[2 * i + 1].p
            pos = 0
            while pos <= f[2 * i + 1].n:
                pos = _next_element(vp, f[2 * i + 1].n, pos, &s, &e)
                if e > s:
                    _put(&out, <const char*>vp + s, e - s)
                    _put(&out, b", ", 2)
        _put_bytes(&out, client)
        _put(&out, b"\r\n", 2)
        _put_header(&out, b"X-Forwarded-Proto", proto)
        if st.host >= 0:
            _put_field(&out, b"X-Forwarded-Host", 16, f[2 * st.host + 1].p, f[2 * st.host + 1].n)
        if via is not None:
            _write_via(&out, f, n, <unsigned char*>act.data, via)
        if request_id is not None:
            rid = request_id
        elif st.rid >= 0:
            value = <object>PyTuple_GET_ITEM(<object>PyList_GET_ITEM(hl, st.rid), 1)
            vp = _ptr(value)
            s = 0
            e = PyBytes_GET_SIZE(value)
            while vp[s] == 0x20 or vp[s] == 0x09:  # _scan saw a non-OWS byte
                s += 1
            while vp[e - 1] == 0x20 or vp[e - 1] == 0x09:
                e -= 1
            rid = value if s == 0 and e == PyBytes_GET_SIZE(value) else \
                PyBytes_FromStringAndSize(<const char*>vp + s, e - s)
        else:
            rid = _new_id()
        _put_header(&out, request_id_header, rid)
        _write_tail(&out, extra_pairs, st.tunnel, framing)
        return PyBytes_FromStringAndSize(out.data, out.size), rid
    finally:
        _buf_free(&out)
        _buf_free(&act)
        _spans_free(&tokens)
        _spans_free(&fields)


cdef bytes _rewrite_response(object status, object reason, object headers, object via,
                             object request_id, object request_id_header, object drop_server,
                             object upgrade, long long framing, object extra, bint checked,
                             bint check_params=True):
    """:func:`rewrite_response_head` with its arguments decided; ``checked`` and
    ``check_params`` as for ``_rewrite_request``."""
    cdef char stack[64]
    cdef _Buf line
    cdef _Span field_stack[64]
    cdef _Spans fields
    cdef list hl
    cdef Py_ssize_t k
    # the checks in the order the reference makes them: status line, added values, fields
    _buf_init(&line, stack, 64)
    try:
        _write_status_line(&line, status, reason)
    finally:
        _buf_free(&line)
    if check_params:
        _check_response_params(via, request_id, request_id_header)
    hl = _own_fields(_as_pairs(headers), extra)
    _spans_init(&fields, field_stack, 64)
    try:
        k = _list_fields(hl, &fields)
        if k < PyList_GET_SIZE(hl):
            _not_bytes_after(fields.items, k, hl, False, via is not None, request_id is not None,
                             request_id_header, upgrade, drop_server, checked)
        return _rewrite_response_fields(status, reason, fields.items, k, via, request_id,
                                        request_id_header, drop_server, upgrade, framing, extra,
                                        checked, False)
    finally:
        _spans_free(&fields)


cdef bytes _rewrite_response_fields(object status, object reason, const _Span* f, Py_ssize_t count,
                                    object via, object request_id, object request_id_header,
                                    object drop_server, object upgrade, long long framing,
                                    object extra, bint checked, bint check_params=True):
    """``_rewrite_response`` of fields given as name, value spans (``f``: ``count`` pairs), as a
    message reader keeps them: no list of bytes objects is made for a response relayed."""
    cdef char stack[STACK_BYTES]
    cdef unsigned char act_stack[128]
    cdef _Span token_stack[16]
    cdef _Buf out
    cdef _Buf act
    cdef _Spans tokens
    cdef _Scan st
    cdef list extra_pairs
    _buf_init(&out, stack, STACK_BYTES)
    _buf_init(&act, <char*>act_stack, 128)
    _spans_init(&tokens, token_stack, 16)
    try:
        _write_status_line(&out, status, reason)
        if check_params:
            _check_response_params(via, request_id, request_id_header)
        if count > act.cap:
            _buf_grow(&act, count)
        _scan(f, count, <unsigned char*>act.data, &tokens, &st, False, via is not None,
              request_id is not None, request_id_header, upgrade, drop_server, checked)
        extra_pairs = _check_extra(extra)

        _write_kept(&out, f, count, <unsigned char*>act.data, &tokens, None)
        if via is not None:
            _write_via(&out, f, count, <unsigned char*>act.data, via)
        if request_id is not None:
            _put_header(&out, request_id_header, request_id)
        _write_tail(&out, extra_pairs, st.tunnel, framing)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        _buf_free(&out)
        _buf_free(&act)
        _spans_free(&tokens)
