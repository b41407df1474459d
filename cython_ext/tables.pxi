# Byte classes (RFC 9110 §5.1, §5.5, §5.6.2; RFC 9112 §3.2) as 256-entry tables, and the
# classification of the header names the rewrite treats specially.

cdef unsigned char _TCHAR[256]      # token characters
cdef unsigned char _VALUE_OK[256]   # field-value / reason-phrase bytes: HTAB, SP, VCHAR, obs-text
cdef unsigned char _TARGET_OK[256]  # request-target bytes: VCHAR, obs-text (no SP, no CTL)
cdef unsigned char _LOWER[256]      # ASCII lower-casing (what bytes.lower() does)
cdef const char* _HEX = b"0123456789abcdef"


cdef void _init_tables() noexcept:
    cdef int c
    cdef const unsigned char* specials = <const unsigned char*>b"!#$%&'*+-.^_`|~"
    for c in range(256):
        _TCHAR[c] = (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A)
        _VALUE_OK[c] = c == 0x09 or 0x20 <= c < 0x7F or c >= 0x80
        _TARGET_OK[c] = 0x20 < c < 0x7F or c >= 0x80
        _LOWER[c] = c + 0x20 if 0x41 <= c <= 0x5A else c
    for c in range(15):
        _TCHAR[specials[c]] = 1


_init_tables()


cdef inline Py_ssize_t _first_bad(const unsigned char* p, Py_ssize_t n,
                                  const unsigned char* table) noexcept nogil:
    """Offset of the first byte of p[:n] outside ``table``'s class, or -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if not table[p[i]]:
            return i
    return -1


cdef inline Py_ssize_t _first_bad_value(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """``_first_bad(p, n, _VALUE_OK)``, eight bytes at a time where it can: a word without a byte
    below 0x20 or equal to 0x7F (exact tests, Bit Twiddling Hacks' hasless / haszero) is all good;
    a word with one (a CTL, or an HTAB that is good) is checked byte by byte from there. Header
    values are validated on every request and response: ~3x fewer instructions than the table
    loop alone."""
    cdef Py_ssize_t i = 0
    cdef unsigned long long w, x
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        x = w ^ 0x7F7F7F7F7F7F7F7FULL
        if (((w - 0x2020202020202020ULL) & ~w) | ((x - 0x0101010101010101ULL) & ~x)) & 0x8080808080808080ULL:
            break
        i += 8
    while i < n:
        if not _VALUE_OK[p[i]]:
            return i
        i += 1
    return -1


cdef inline bint _ieq(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    """ASCII case-insensitive equality of a[:n] and b[:n]."""
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[a[i]] != _LOWER[b[i]]:
            return False
    return True


# Header classes for the rewrite; the reference module's _CLASS table says the same.
cdef enum:
    H_OTHER = 0
    H_HOP = 1
    H_CONNECTION = 2
    H_UPGRADE = 3
    H_HOST = 4
    H_XFF = 5
    H_XFWD = 6       # X-Forwarded-Proto / X-Forwarded-Host: regenerated
    H_VIA = 7
    H_SERVER = 8
    H_FORWARDED = 9
    H_RID = 10
    MAX_KNOWN = 19   # len("proxy-authorization"): longer names are never special


cdef inline int _classify(const unsigned char* name, Py_ssize_t n) noexcept nogil:
    """Class of a header name (any case); switch on length, then compare lower-cased bytes."""
    cdef unsigned char low[MAX_KNOWN]
    cdef const char* s = <const char*>low
    cdef Py_ssize_t i
    if n > MAX_KNOWN or n < 2:
        return H_OTHER
    for i in range(n):
        low[i] = _LOWER[name[i]]
    if n == 2:
        if memcmp(s, b"te", 2) == 0:
            return H_HOP
    elif n == 3:
        if memcmp(s, b"via", 3) == 0:
            return H_VIA
    elif n == 4:
        if memcmp(s, b"host", 4) == 0:
            return H_HOST
    elif n == 6:
        if memcmp(s, b"server", 6) == 0:
            return H_SERVER
    elif n == 7:
        if memcmp(s, b"upgrade", 7) == 0:
            return H_UPGRADE
    elif n == 9:
        if memcmp(s, b"forwarded", 9) == 0:
            return H_FORWARDED
    elif n == 10:
        if memcmp(s, b"connection", 10) == 0:
            return H_CONNECTION
        if memcmp(s, b"keep-alive", 10) == 0:
            return H_HOP
    elif n == 14:
        if memcmp(s, b"content-length", 14) == 0:
            return H_HOP
    elif n == 15:
        if memcmp(s, b"x-forwarded-for", 15) == 0:
            return H_XFF
    elif n == 16:
        if memcmp(s, b"proxy-connection", 16) == 0:
            return H_HOP
        if memcmp(s, b"x-forwarded-host", 16) == 0:
            return H_XFWD
    elif n == 17:
        if memcmp(s, b"transfer-encoding", 17) == 0:
            return H_HOP
        if memcmp(s, b"x-forwarded-proto", 17) == 0:
            return H_XFWD
    elif n == 18:
        if memcmp(s, b"proxy-authenticate", 18) == 0:
            return H_HOP
    elif n == 19:
        if memcmp(s, b"proxy-authorization", 19) == 0:
            return H_HOP
    return H_OTHER
