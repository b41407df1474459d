# The fields of a head the proxy decides on, noted by the message readers as they split its
# lines (included by _protocol.pyx).
#
# Finding Host, Content-Length, Transfer-Encoding and Expect used to take five scans of the list
# (get_first/get_all each lower-casing every name) plus the interpreted framing functions of
# pyproxy.headers: ~2 µs a request. Here each name is compared by its length first. Only the
# plain cases are decided here — no Transfer-Encoding and at most one Content-Length of plain
# digits; anything else goes to pyproxy.headers' request_framing/response_framing, which hold the
# full rules and their error messages, so the rules live in one place.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE


cdef long long _plain_length(bytes value):
    """The value of a Content-Length of 1-18 plain digits, or -1 (then the full rules decide)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(value), i
    cdef const char* p = PyBytes_AS_STRING(value)
    cdef long long n = 0
    if size == 0 or size > 18:
        return -1
    for i in range(size):
        if not 48 <= p[i] <= 57:
            return -1
        n = n * 10 + (p[i] - 48)
    return n


cdef class HeadFields:
    """What one pass over a header list found (values are the first of their name)."""

    cdef public object host, content_length, expect
    cdef public int hosts, lengths
    cdef public bint transfer_encoding

    cdef void clear(self) noexcept:
        self.host = self.content_length = self.expect = None
        self.hosts = self.lengths = 0
        self.transfer_encoding = False

    cdef int note(self, const unsigned char* name, Py_ssize_t size, const unsigned char* v,
                  Py_ssize_t nv) except -1:
        """One header line of the head being read (its checked name and value); the values kept
        are made into bytes."""
        if size == 4:
            if _ieq(name, <const unsigned char*>b"host", 4):
                self.hosts += 1
                if self.host is None:
                    self.host = PyBytes_FromStringAndSize(<const char*>v, nv)
        elif size == 14:
            if _ieq(name, <const unsigned char*>b"content-length", 14):
                self.lengths += 1
                if self.content_length is None:
                    self.content_length = PyBytes_FromStringAndSize(<const char*>v, nv)
        elif size == 17:
            if _ieq(name, <const unsigned char*>b"transfer-encoding", 17):
                self.transfer_encoding = True
        elif size == 6:
            if self.expect is None and _ieq(name, <const unsigned char*>b"expect", 6):
                self.expect = PyBytes_FromStringAndSize(<const char*>v, nv)
        return 0

    cdef long long plain_framing(self):
        """The body length when the plain rules decide it (no Transfer-Encoding, at most one
        Content-Length of plain digits; 0 without either), else -1."""
        if self.transfer_encoding or self.lengths > 1:
            return -1
        if self.lengths == 0:
            return 0
        return _plain_length(self.content_length)
