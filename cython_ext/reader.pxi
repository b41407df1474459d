# The HTTP/1.1 message readers (included by _protocol.pyx): pull parsers over the reads of one
# connection — RequestReader for a client's requests, ResponseReader for an upstream's responses.
#
# httptools (llhttp) drove the data plane through Python callbacks: a call and two new bytes
# objects per header line, a call per body piece (which it copied), calls for the URL, the status,
# the end of the head and of the message, and more to ask for the method, version, keep-alive:
# ~20 Python calls per proxied exchange. Here one C loop finds the end of a head (its LFs, with
# memchr), checks and splits its lines, and hands the caller events; a body piece that is a whole
# read is passed on as the read itself (no copy).
#
# Strict as llhttp is (RFC 9112), since a proxy must neither forward what another parser could
# frame differently (request smuggling) nor relay what it cannot frame: CRLF line ends only (a
# bare LF is an error), single SPs in the start line, "HTTP/1.0" or "HTTP/1.1", a method that is
# a token and a target of VCHAR / obs-text, a 3-digit status >= 100 and a reason phrase of HTAB /
# SP / VCHAR / obs-text; header names that are tokens with the colon right after them (no
# whitespace before it), no obs-fold, values without CTLs but HTAB; chunk sizes in hex below
# 2^63, extensions ";name" or ";name=value" (a token or a quoted-string) with no whitespace,
# CRLF after each chunk's data, trailer lines checked as header lines (and dropped; Content-Length
# and Transfer-Encoding refused there); connection options split at every comma. Empty lines before a request line are skipped (RFC 9112
# §2.2). How a body is delimited is the caller's decision (Content-Length and Transfer-Encoding by
# pyproxy.headers' rules; for a response RFC 9112 §6.3 depends on the request), given to
# expect_body() after each head. Every problem is a HeaderError: 400 for a request (431 for its
# size limits, 414 for a request line longer than them, 505 for HTTP/2.0), 502 for a response.

from cpython.bytearray cimport PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.string cimport memchr


cpdef enum:  # what next_event found (module attributes for Python too)
    EV_MORE = 0  # everything read so far is consumed: feed the next read
    EV_HEAD = 1  # a head: its fields are the reader's attributes
    EV_BODY = 2  # a piece of the body: ``body``
    EV_END = 3   # the message ended (``unread`` bytes of the read follow it)

cdef enum:  # where a reader is
    S_HEAD = 0
    S_FRAMING = 1      # a head was read; expect_body() says how its body is delimited
    S_LENGTH = 2
    S_CHUNK_SIZE = 3
    S_CHUNK_DATA = 4
    S_CHUNK_CRLF = 5   # the CRLF after a chunk's data
    S_TRAILERS = 6
    S_UNTIL_CLOSE = 7
    S_END = 8          # the message is complete: EV_END next
    S_DONE = 9         # EV_END was given: next_message() or reset() goes on

cdef object _RELEASED = []  # MessageReader._headers once the head was released unasked
cdef Py_ssize_t _MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions


cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef inline object _shown(const unsigned char* p, Py_ssize_t n):
    """The first bytes of p[:n], for an error message."""
    return PyBytes_FromStringAndSize(<const char*>p, min(n, 64))


cdef Py_ssize_t _head_end(const unsigned char* p, Py_ssize_t n, Py_ssize_t start, int status) except -2:
    """Index just past the CRLF CRLF that ends the head in p[:n], or -1 while it is incomplete.
    LFs before ``start`` were checked by an earlier call; each LF must follow a CR."""
    cdef const unsigned char* q
    cdef Py_ssize_t k
    while start < n:
        q = <const unsigned char*>memchr(p + start, 10, n - start)
        if q == NULL:
            return -1
        k = q - p
        if k == 0 or p[k - 1] != 13:
            raise HeaderError("a line ends with a bare LF", None, status)
        if k >= 3 and p[k - 2] == 10:  # (p[k-3] is the CR before that LF, checked already)
            return k + 1
        start = k + 1
    return -1


cdef int _field_line(const unsigned char* p, Py_ssize_t n, Py_ssize_t* colon,
                     Py_ssize_t* vs, Py_ssize_t* ve, int status) except -1:
    """Check a header (or trailer) line p[:n], without its CRLF; set the colon's index and the
    value's OWS-stripped bounds. A problem is a HeaderError with ``status``."""
    cdef const unsigned char* c
    cdef Py_ssize_t bad, s = 0, e
    while s < n and _TCHAR[p[s]]:  # the name, up to its colon (one pass: the usual case)
        s += 1
    if s == 0 or s == n or p[s] != 58:
        if p[0] == 32 or p[0] == 9:
            raise HeaderError("obs-fold (a header line continued on the next line)", None, status)
        c = <const unsigned char*>memchr(p, 58, n)
        if c == NULL:
            raise HeaderError(f"not a header line: {_shown(p, n)!r}", None, status)
        if c == p:
            raise HeaderError("a header line with an empty name", None, status)
        name = PyBytes_FromStringAndSize(<const char*>p, c - p)
        if p[s] == 32 or p[s] == 9:
            raise HeaderError(f"whitespace before the colon of header {name!r}", name, status)
        raise HeaderError(f"invalid character {p[s]:#04x} in header name {name!r}", name, status)
    colon[0] = s
    s += 1
    e = n
    while s < e and (p[s] == 32 or p[s] == 9):
        s += 1
    while e > s and (p[e - 1] == 32 or p[e - 1] == 9):
        e -= 1
    bad = _first_bad_value(p + s, e - s)
    if bad >= 0:
        name = PyBytes_FromStringAndSize(<const char*>p, colon[0])
        raise HeaderError(f"invalid character {p[s + bad]:#04x} in the value of header {name!r}", name, status)
    vs[0] = s
    ve[0] = e
    return 0


cdef Py_ssize_t _chunk_ext(const unsigned char* p, Py_ssize_t n, Py_ssize_t i, int status) except -1:
    """One chunk extension after its ";" at ``i``: where the next begins (or ``n``)."""
    cdef Py_ssize_t start = i
    while i < n and _TCHAR[p[i]]:
        i += 1
    if i == start:
        raise HeaderError("a chunk extension without a name", None, status)
    if i == n or p[i] == 59:
        return i
    if p[i] != 61:  # '='
        raise HeaderError(f"invalid chunk extension {_shown(p + start, n - start)!r}", None, status)
    i += 1
    if i < n and p[i] == 34:  # a quoted-string
        i += 1
        while i < n and p[i] != 34:
            if p[i] == 92:  # quoted-pair
                i += 1
                if i == n or not _VALUE_OK[p[i]]:
                    raise HeaderError("invalid quoted-pair in a chunk extension", None, status)
            elif not _VALUE_OK[p[i]]:
                raise HeaderError("invalid character in a chunk extension", None, status)
            i += 1
        if i == n:
            raise HeaderError("an unterminated quoted-string in a chunk extension", None, status)
        return i + 1
    start = i
    while i < n and _TCHAR[p[i]]:
        i += 1
    if i == start or (i < n and p[i] != 59):
        raise HeaderError(f"invalid chunk extension value {_shown(p + start, n - start)!r}", None, status)
    return i


cdef struct _Options:  # the Connection (and, for requests, Proxy-Connection) options of a head
    bint close
    bint keep_alive
    bint upgrade


cdef void _connection_options(const unsigned char* p, Py_ssize_t n, _Options* o) noexcept:
    # Connection options are tokens (RFC 9110 §7.6.1): split at every comma, as llhttp does (a
    # quote is no quoted-string here, so it cannot hide a "close").
    cdef Py_ssize_t pos = 0, s, e
    while pos <= n:
        s = pos
        while pos < n and p[pos] != 44:
            pos += 1
        e = pos
        pos += 1
        while s < e and (p[s] == 32 or p[s] == 9):
            s += 1
        while e > s and (p[e - 1] == 32 or p[e - 1] == 9):
            e -= 1
        if e - s == 5 and _ieq(p + s, <const unsigned char*>b"close", 5):
            o.close = True
        elif e - s == 10 and _ieq(p + s, <const unsigned char*>b"keep-alive", 10):
            o.keep_alive = True
        elif e - s == 7 and _ieq(p + s, <const unsigned char*>b"upgrade", 7):
            o.upgrade = True


cdef class MessageReader:
    """What reading requests and responses share: the head's framing, header lines, bodies.

    ``feed(read)``, then ``next_event()`` until it returns ``EV_MORE``: ``EV_HEAD`` (the caller
    answers with ``expect_body(framing)``), ``EV_BODY`` (``body``), ``EV_END`` (then
    ``next_message()`` reads on in the same read, ``reset()`` drops it).
    """

    cdef object data  # the read being parsed
    cdef Py_ssize_t pos  # how much of it is consumed
    cdef bytearray carry  # an incomplete head, chunk-size line or trailer line of earlier reads
    cdef int state
    cdef long long remaining  # of the Content-Length body or the current chunk
    cdef int crlf  # bytes of the CRLF after a chunk's data seen
    cdef Py_ssize_t trailer_bytes
    cdef Py_ssize_t skipped  # bytes of empty lines skipped before the next head
    cdef int error_status, too_large_status  # of the HeaderErrors raised
    cdef bint upgrade_field, connection_upgrade  # an Upgrade field; the "upgrade" option
    cdef readonly Py_ssize_t max_head, max_headers
    cdef readonly int version  # 10 or 11
    # The head's fields as name, value spans into ``head`` (the read it came in, or a copy of
    # what several reads brought): valid until the next head, release_head() or reset().
    cdef _Spans lines
    cdef _Span line_stack[64]
    cdef object head
    cdef list _headers  # the fields as a list of (name, value) bytes pairs, made when asked for
    cdef readonly bint keep_alive  # the connection may carry another exchange after this one
    cdef readonly object body  # the piece EV_BODY found
    cdef readonly HeadFields fields  # what the proxy decides on, noted while the head is split

    def __init__(self, Py_ssize_t max_head=16384, Py_ssize_t max_headers=100) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self.carry = bytearray()
        self.fields = HeadFields()
        _spans_init(&self.lines, self.line_stack, 64)
        self.reset()

    def __dealloc__(self):
        _spans_free(&self.lines)

    cdef inline void _clear_carry(self) noexcept:
        # (a C call, where ``del carry[:]`` builds a slice object: it runs for every message)
        if PyByteArray_GET_SIZE(self.carry):
            PyByteArray_Resize(self.carry, 0)

    cpdef reset(self):
        """Forget everything: the next bytes fed start a new message."""
        self.data = b""
        self.pos = 0
        self._clear_carry()
        self.next_message()

    cpdef next_message(self):
        """Read the next message from where the last one ended (the rest of the read)."""
        self.state = S_HEAD
        self.remaining = 0
        self.skipped = 0
        self.version = 0
        self.lines.size = 0  # (no head yet: its fields are [])
        self.head = None
        self._headers = None
        self.keep_alive = False
        self.body = b""

    cpdef release_head(self):
        """Let the head's bytes go (its fields are then only what ``headers`` made of them)."""
        self.lines.size = 0
        self.head = None
        if self._headers is None:
            self._headers = _RELEASED

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The head's fields as (name, value) pairs, checked (made on first use)."""
        return self.header_list()

    cpdef list header_list(self):
        cdef Py_ssize_t i
        cdef list out
        if self._headers is None:
            out = []
            for i in range(0, self.lines.size, 2):
                out.append((PyBytes_FromStringAndSize(<const char*>self.lines.items[i].p, self.lines.items[i].n),
                            PyBytes_FromStringAndSize(<const char*>self.lines.items[i + 1].p, self.lines.items[i + 1].n)))
            self._headers = out
        elif self._headers is _RELEASED:
            raise RuntimeError("the head was released before its fields were asked for")
        return self._headers

    cpdef feed(self, bytes data):
        """The connection's next read (what was left of the previous one is dropped)."""
        self.feed_at(data, 0)

    @property
    def unread(self) -> int:
        """Bytes of the current read not consumed (after EV_END: what followed the message)."""
        return self.unread_bytes()

    cdef inline Py_ssize_t unread_bytes(self) noexcept:
        return PyBytes_GET_SIZE(self.data) - self.pos

    @property
    def head_pending(self) -> int:
        """Bytes of the next head read so far (empty lines before it included), 0 while none."""
        return self.head_bytes()

    cdef inline Py_ssize_t carried_bytes(self) noexcept:
        """Bytes of a head begun (empty lines before it not counted)."""
        return PyByteArray_GET_SIZE(self.carry) if self.state == S_HEAD else 0

    cdef inline Py_ssize_t head_bytes(self) noexcept:
        return PyByteArray_GET_SIZE(self.carry) + self.skipped if self.state == S_HEAD else 0

    cpdef feed_at(self, bytes data, Py_ssize_t start):
        """``feed(data)`` from ``start`` on (a read whose beginning was parsed earlier)."""
        if not 0 <= start <= PyBytes_GET_SIZE(data):
            raise ValueError(f"start {start} outside the {PyBytes_GET_SIZE(data)} bytes")
        self.data = data
        self.pos = start

    cpdef Py_ssize_t let_go(self):
        """Let the current read go unparsed from here; where that was (``feed_at`` it later)."""
        cdef Py_ssize_t pos = self.pos
        self.data = b""
        self.pos = 0
        return pos

    cpdef bytes rest(self):
        """The unconsumed bytes of the current read (after an upgrade: the tunnel's first bytes)."""
        cdef bytes data = self.data
        return data[self.pos:] if self.pos else data

    cpdef expect_body(self, long long framing):
        """How the body of the head just read is delimited: its length (0: none), CHUNKED or
        UNTIL_CLOSE (pyproxy.headers' constants)."""
        if self.state != S_FRAMING:
            raise RuntimeError("expect_body() without a head")
        if framing > 0:
            self.remaining = framing
            self.state = S_LENGTH
        elif framing == 0:
            self.state = S_END
        elif framing == FRAMING_CHUNKED:
            self.state = S_CHUNK_SIZE
        elif framing == FRAMING_NONE:
            self.state = S_UNTIL_CLOSE
            self.keep_alive = False
        else:
            raise ValueError(f"invalid framing {framing}")

    cpdef bint finish(self):
        """The connection was closed: whether that completes the message (a body read until
        close)."""
        if self.state == S_UNTIL_CLOSE:
            self.state = S_DONE
            return True
        return self.state == S_DONE

    cpdef int next_event(self) except -1:
        cdef int event = self._next()
        if event == EV_MORE:
            # The read is used up: let it go now. Kept until the next read, its buffer would
            # not be reused for that read (a cold one instead: ~1 µs more kernel time to fill
            # it, per 16 KiB response).
            self.data = b""
            self.pos = 0
        return event

    cdef int _next(self) except -1:
        cdef bytes data = self.data
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), avail, take, end, old
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* line
        cdef Py_ssize_t size
        while True:
            avail = n - self.pos
            if self.state == S_LENGTH or self.state == S_CHUNK_DATA:
                if avail == 0:
                    return EV_MORE
                take = avail if avail < self.remaining else <Py_ssize_t>self.remaining
                self.body = data if take == n else data[self.pos:self.pos + take]
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if self.state == S_LENGTH:
                        self.state = S_END
                    else:
                        self.state = S_CHUNK_CRLF
                        self.crlf = 0
                return EV_BODY
            elif self.state == S_HEAD:
                if avail == 0:
                    return EV_MORE
                if self._skip_empty_lines(p, n):
                    continue
                if len(self.carry) == 0:
                    end = _head_end(p + self.pos, avail, 0, self.error_status)
                    if end >= 0:
                        self._head(data, p + self.pos, end)
                        self.pos += end
                        return EV_HEAD
                    self.carry += data[self.pos:] if self.pos else data
                    self.pos = n
                    self._check_pending()
                    return EV_MORE
                old = len(self.carry)
                self.carry += data[self.pos:] if self.pos else data
                end = _head_end(<const unsigned char*><char*>self.carry, len(self.carry), old, self.error_status)
                if end < 0:
                    self.pos = n
                    self._check_pending()
                    return EV_MORE
                head = PyBytes_FromStringAndSize(<char*>self.carry, end)  # (the spans point into it)
                self._head(head, <const unsigned char*>PyBytes_AS_STRING(head), end)
                self.pos += end - old
                self._clear_carry()
                return EV_HEAD
            elif self.state == S_CHUNK_SIZE or self.state == S_TRAILERS:
                size = self._take_line(&line)
                if size < 0:
                    return EV_MORE
                if self.state == S_CHUNK_SIZE:
                    self._chunk_size(line, size)
                elif size == 0:
                    self.state = S_END
                else:
                    self.trailer_bytes += size + 2
                    if self.trailer_bytes > self.max_head:
                        raise HeaderError("trailer section too large", None, self.too_large_status)
                    self._trailer(line, size)
                self._clear_carry()
            elif self.state == S_CHUNK_CRLF:
                while self.crlf < 2 and self.pos < n:
                    if p[self.pos] != (13 if self.crlf == 0 else 10):
                        raise HeaderError("chunk data not followed by CRLF", None, self.error_status)
                    self.pos += 1
                    self.crlf += 1
                if self.crlf < 2:
                    return EV_MORE
                self.state = S_CHUNK_SIZE
            elif self.state == S_UNTIL_CLOSE:
                if avail == 0:
                    return EV_MORE
                self.body = data if self.pos == 0 else data[self.pos:]
                self.pos = n
                return EV_BODY
            elif self.state == S_END:
                self.state = S_DONE
                return EV_END
            elif self.state == S_DONE:
                return EV_MORE
            else:  # S_FRAMING
                raise RuntimeError("a head was read: call expect_body() first")

    cdef bint _skip_empty_lines(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Before a head: whether bytes of the read were skipped (requests only)."""
        return False

    cdef int _check_pending(self) except -1:
        """An incomplete head is kept: it must stay within the limit."""
        if len(self.carry) > self.max_head:
            raise HeaderError(f"{self._kind()} head too large", None, self.too_large_status)
        return 0

    cdef str _kind(self):
        return "message"

    cdef int _head(self, bytes head, const unsigned char* p, Py_ssize_t n) except -1:
        """Check and split the head p[:n] (its final CRLF CRLF included), which ``head`` holds."""
        cdef const unsigned char* q = <const unsigned char*>memchr(p, 10, n)
        cdef Py_ssize_t line_end = (q - p) - 1  # the CR ending the start line
        cdef Py_ssize_t pos, end, colon, vs, ve, count = 0
        cdef _Options options
        cdef HeadFields fields
        # The spans of an earlier head (an interim 1xx) go before the bytes they point into.
        self.lines.size = 0
        self._headers = None
        self.head = head
        if n > self.max_head:
            raise HeaderError(f"{self._kind()} head too large", None, self.too_large_status)
        self._start_line(p, line_end)
        options.close = options.keep_alive = options.upgrade = False
        self.upgrade_field = False
        fields = self.fields
        fields.clear()
        pos = line_end + 2
        while pos < n - 2:
            q = <const unsigned char*>memchr(p + pos, 10, n - pos)
            end = (q - p) - 1  # each LF follows a CR (_head_end checked)
            _field_line(p + pos, end - pos, &colon, &vs, &ve, self.error_status)
            count += 1
            if count > self.max_headers:
                raise HeaderError(f"more than {self.max_headers} header lines", None, self.too_large_status)
            _spans_push(&self.lines, p + pos, colon)
            _spans_push(&self.lines, p + pos + vs, ve - vs)
            fields.note(p + pos, colon, p + pos + vs, ve - vs)
            if self._options_field(p + pos, colon):
                _connection_options(p + pos + vs, ve - vs, &options)
            elif colon == 7 and _ieq(p + pos, <const unsigned char*>b"upgrade", 7):
                self.upgrade_field = True
            pos = end + 2
        # RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive"
        self.keep_alive = not options.close and (self.version == 11 or options.keep_alive)
        self.connection_upgrade = options.upgrade
        self.state = S_FRAMING
        return 0

    cdef int _start_line(self, const unsigned char* p, Py_ssize_t n) except -1:
        raise NotImplementedError

    cdef bint _options_field(self, const unsigned char* name, Py_ssize_t n) noexcept:
        """Whether a field of this name carries connection options."""
        return n == 10 and _ieq(name, <const unsigned char*>b"connection", 10)

    cdef Py_ssize_t _take_line(self, const unsigned char** line) except -2:
        """The next complete line (without its CRLF) of the read, joined with what earlier reads
        left in ``carry``; -1 (and the bytes kept) while it is incomplete. The caller empties
        ``carry`` once it has used the line."""
        cdef bytes data = self.data
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), k, size
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* q = <const unsigned char*>memchr(p + self.pos, 10, n - self.pos)
        cdef Py_ssize_t limit = _MAX_CHUNK_LINE if self.state == S_CHUNK_SIZE else self.max_head
        if q == NULL:
            self.carry += data[self.pos:]
            self.pos = n
            if len(self.carry) > limit:
                self._line_too_long()
            return -1
        k = q - p
        if len(self.carry) == 0:
            line[0] = p + self.pos
            size = k - self.pos
        else:
            self.carry += data[self.pos:k + 1]
            line[0] = <const unsigned char*><char*>self.carry
            size = len(self.carry) - 1
        self.pos = k + 1
        if size == 0 or line[0][size - 1] != 13:
            raise HeaderError("a line ends with a bare LF", None, self.error_status)
        if size - 1 > limit:
            self._line_too_long()
        return size - 1

    cdef int _line_too_long(self) except -1:
        if self.state == S_CHUNK_SIZE:
            raise HeaderError("chunk-size line too long", None, self.error_status)
        raise HeaderError("trailer section too large", None, self.too_large_status)

    cdef int _chunk_size(self, const unsigned char* p, Py_ssize_t n) except -1:
        """chunk-size [ chunk-ext ] (RFC 9112 §7.1), as strictly as llhttp reads it: hex digits,
        then any ``;name`` or ``;name=value`` (a token, or a quoted-string) with no whitespace."""
        cdef Py_ssize_t i = 0
        cdef long long size = 0
        cdef int v
        while i < n:
            v = _hex_value(p[i])
            if v < 0:
                break
            if size >= (1LL << 59):
                raise HeaderError("chunk size too large", None, self.error_status)
            size = size * 16 + v
            i += 1
        if i == 0:
            raise HeaderError(f"invalid chunk size {_shown(p, n)!r}", None, self.error_status)
        while i < n:
            if p[i] != 59:  # ';'
                raise HeaderError(f"invalid chunk size {_shown(p, n)!r}", None, self.error_status)
            i = _chunk_ext(p, n, i + 1, self.error_status)
        if size == 0:
            self.state = S_TRAILERS
            self.trailer_bytes = 0
        else:
            self.remaining = size
            self.state = S_CHUNK_DATA
        return 0

    cdef int _trailer(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t colon, vs, ve
        _field_line(p, n, &colon, &vs, &ve, self.error_status)
        # Framing fields have no place after the body (RFC 9110 §6.5.1); another parser merging
        # them into the head would frame the message differently (llhttp refuses them too).
        if ((colon == 14 and _ieq(p, <const unsigned char*>b"content-length", 14))
                or (colon == 17 and _ieq(p, <const unsigned char*>b"transfer-encoding", 17))):
            name = PyBytes_FromStringAndSize(<const char*>p, colon)
            raise HeaderError(f"{name.decode()} in the trailer section", name, self.error_status)
        return 0


cdef class ResponseReader(MessageReader):
    """Reads the responses of one upstream connection (errors: HeaderError, status 502). After
    an interim (1xx) head, ``next_head()`` waits for the final one."""

    cdef readonly int status
    cdef readonly bytes reason

    def __init__(self, Py_ssize_t max_head=16384, Py_ssize_t max_headers=100) -> None:
        self.error_status = self.too_large_status = 502
        super().__init__(max_head, max_headers)

    cpdef next_message(self):
        MessageReader.next_message(self)
        self.status = 0
        self.reason = b""

    cpdef next_head(self):
        """After an interim (1xx) head: the final response's head comes next."""
        if self.state != S_FRAMING:
            raise RuntimeError("next_head() without a head")
        self.state = S_HEAD

    cdef str _kind(self):
        return "response"

    cdef int _start_line(self, const unsigned char* p, Py_ssize_t n) except -1:
        if (n < 12 or memcmp(p, b"HTTP/", 5) != 0 or not 48 <= p[5] <= 57 or p[6] != 46
                or not 48 <= p[7] <= 57 or p[8] != 32 or not 49 <= p[9] <= 57
                or not 48 <= p[10] <= 57 or not 48 <= p[11] <= 57 or (n > 12 and p[12] != 32)):
            raise HeaderError(f"malformed status line {_shown(p, n)!r}", None, 502)
        if p[5] != 49 or p[7] > 49:
            raise HeaderError(f"unsupported version {_shown(p, 8).decode()}", None, 502)
        self.status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
        self.version = 10 + (p[7] - 48)
        if n <= 13:
            self.reason = b""  # none (even without its SP: tolerated, as llhttp does)
        else:
            if _first_bad_value(p + 13, n - 13) >= 0:
                raise HeaderError("invalid character in the reason phrase", None, 502)
            self.reason = PyBytes_FromStringAndSize(<const char*>p + 13, n - 13)
        return 0


cdef class RequestReader(MessageReader):
    """Reads the requests of one client connection (errors: HeaderError, status 400; 431 for a
    head over the limits, 414 for a request line alone over them, 505 for HTTP/2.0).
    ``upgrade``: the request asks for a protocol switch (an Upgrade field and the "upgrade"
    connection option, as llhttp decides it)."""

    cdef readonly bytes method, target

    def __init__(self, Py_ssize_t max_head=16384, Py_ssize_t max_headers=100) -> None:
        self.error_status = 400
        self.too_large_status = 431
        super().__init__(max_head, max_headers)

    cpdef next_message(self):
        MessageReader.next_message(self)
        self.method = self.target = b""

    @property
    def upgrade(self) -> bool:
        return self.wants_upgrade()

    cdef inline bint wants_upgrade(self) noexcept:
        return self.upgrade_field and self.connection_upgrade

    cdef str _kind(self):
        return "request"

    cdef bint _skip_empty_lines(self, const unsigned char* p, Py_ssize_t n) except -1:
        # RFC 9112 §2.2: empty lines before a request line are ignored (a client may send a CRLF
        # after a POST body). A CR that ended a read alone waits in ``carry`` for its LF.
        cdef Py_ssize_t start = self.pos
        if len(self.carry) == 1 and self.carry[0] == 13:
            if p[self.pos] != 10:
                raise HeaderError("a request line begins with a CR", None, 400)
            self._clear_carry()
            self.pos += 1
        if len(self.carry) == 0:
            while n - self.pos >= 2 and p[self.pos] == 13 and p[self.pos + 1] == 10:
                self.pos += 2
            if self.pos < n and p[self.pos] == 10:
                raise HeaderError("a line ends with a bare LF", None, 400)
        # (counted as head: they neither restart the head timer nor go on without limit)
        self.skipped += self.pos - start
        if self.skipped > self.max_head:
            raise HeaderError("too many empty lines before a request line", None, 400)
        return self.pos != start

    cdef int _check_pending(self) except -1:
        # An empty line kept alone is skipped once its LF comes.
        if len(self.carry) == 1 and self.carry[0] == 13:
            return 0
        if len(self.carry) > self.max_head:
            if memchr(<const char*><char*>self.carry, 10, self.max_head) == NULL:
                raise HeaderError("request line too long", None, 414)
            raise HeaderError("request head too large", None, 431)
        return 0

    cdef int _start_line(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef const unsigned char* sp1 = <const unsigned char*>memchr(p, 32, n)
        cdef const unsigned char* sp2
        cdef Py_ssize_t m, t, v
        if sp1 == NULL:
            raise HeaderError(f"malformed request line {_shown(p, n)!r}", None, 400)
        m = sp1 - p
        sp2 = <const unsigned char*>memchr(sp1 + 1, 32, n - m - 1)
        if sp2 == NULL:
            raise HeaderError(f"malformed request line {_shown(p, n)!r}", None, 400)
        t = sp2 - sp1 - 1
        v = n - (sp2 - p) - 1
        if m == 0 or _first_bad(p, m, _TCHAR) >= 0:
            raise HeaderError(f"invalid method in request line {_shown(p, n)!r}", None, 400)
        if t == 0 or _first_bad(sp1 + 1, t, _TARGET_OK) >= 0:
            raise HeaderError(f"invalid request target in {_shown(p, n)!r}", None, 400)
        if (v != 8 or memcmp(sp2 + 1, b"HTTP/", 5) != 0 or not 48 <= sp2[6] <= 57 or sp2[7] != 46
                or not 48 <= sp2[8] <= 57):
            raise HeaderError(f"malformed request line {_shown(p, n)!r}", None, 400)
        if sp2[6] == 50 and sp2[8] == 48:  # HTTP/2.0 is a version, just not one spoken here
            raise HeaderError("HTTP/2.0 is not supported", None, 505)
        if sp2[6] != 49 or sp2[8] > 49:
            raise HeaderError(f"unsupported version {_shown(sp2 + 1, 8).decode()}", None, 400)
        self.version = 10 + (sp2[8] - 48)
        self.method = PyBytes_FromStringAndSize(<const char*>p, m)
        self.target = PyBytes_FromStringAndSize(<const char*>sp1 + 1, t)
        return 0

    cdef bint _options_field(self, const unsigned char* name, Py_ssize_t n) noexcept:
        # llhttp reads a request's Proxy-Connection as it reads Connection
        return ((n == 10 and _ieq(name, <const unsigned char*>b"connection", 10))
                or (n == 16 and _ieq(name, <const unsigned char*>b"proxy-connection", 16)))
