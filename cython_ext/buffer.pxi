# Output buffer: starts in the caller's stack array, moves to the heap only for unusually large
# heads, and becomes the result bytes with one copy. Every writer checks capacity itself.

cdef enum:
    STACK_BYTES = 4096  # a browser request head is ~0.5-2 KB


cdef struct _Buf:
    char* data
    char* stack
    Py_ssize_t size
    Py_ssize_t cap


cdef inline void _buf_init(_Buf* b, char* stack, Py_ssize_t cap) noexcept:
    b.data = stack
    b.stack = stack
    b.size = 0
    b.cap = cap


cdef inline void _buf_free(_Buf* b) noexcept:
    if b.data != b.stack:
        free(b.data)
    b.data = b.stack


cdef int _buf_grow(_Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = b.cap * 2
    cdef char* p
    while cap < b.size + need:
        cap *= 2
    if b.data == b.stack:
        p = <char*>malloc(cap)
        if p == NULL:
            raise MemoryError()
        memcpy(p, b.data, b.size)
    else:
        p = <char*>realloc(b.data, cap)
        if p == NULL:
            raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int _put(_Buf* b, const char* s, Py_ssize_t n) except -1:
    if b.size + n > b.cap:
        _buf_grow(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef inline int _put_bytes(_Buf* b, object s) except -1:
    return _put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int _put_field(_Buf* b, const void* name, Py_ssize_t nn, const void* value,
                           Py_ssize_t nv) except -1:
    """``name: value CRLF``"""
    cdef Py_ssize_t need = nn + nv + 4
    cdef char* w
    if b.size + need > b.cap:
        _buf_grow(b, need)
    w = b.data + b.size
    memcpy(w, name, nn)
    w += nn
    w[0] = c':'
    w[1] = c' '
    memcpy(w + 2, value, nv)
    w += 2 + nv
    w[0] = c'\r'
    w[1] = c'\n'
    b.size += need
    return 0


cdef inline int _put_header(_Buf* b, object name, object value) except -1:
    return _put_field(b, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name),
                      PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cdef int _put_uint(_Buf* b, unsigned long long v) except -1:
    cdef char digits[24]
    cdef int i = 24
    while True:
        i -= 1
        digits[i] = <char>(c'0' + v % 10)
        v //= 10
        if v == 0:
            break
    return _put(b, digits + i, 24 - i)


# Growable list of byte spans (Connection options; a head's fields as name, value pairs), same
# stack-then-heap scheme.

cdef struct _Span:
    const unsigned char* p
    Py_ssize_t n


cdef struct _Spans:
    _Span* items
    _Span* stack
    Py_ssize_t size
    Py_ssize_t cap


cdef inline void _spans_init(_Spans* s, _Span* stack, Py_ssize_t cap) noexcept:
    s.items = stack
    s.stack = stack
    s.size = 0
    s.cap = cap


cdef inline void _spans_free(_Spans* s) noexcept:
    if s.items != s.stack:
        free(s.items)
    s.items = s.stack


cdef inline int _spans_push(_Spans* s, const unsigned char* p, Py_ssize_t n) except -1:
    if s.size == s.cap:
        _spans_grow(s)
    s.items[s.size].p = p
    s.items[s.size].n = n
    s.size += 1
    return 0


cdef int _spans_grow(_Spans* s) except -1:
    cdef _Span* items
    if s.size == s.cap:
        if s.items == s.stack:
            items = <_Span*>malloc(2 * s.cap * sizeof(_Span))
            if items == NULL:
                raise MemoryError()
            memcpy(items, s.items, s.size * sizeof(_Span))
        else:
            items = <_Span*>realloc(s.items, 2 * s.cap * sizeof(_Span))
            if items == NULL:
                raise MemoryError()
        s.items = items
        s.cap *= 2
    return 0
