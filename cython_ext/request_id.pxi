# Request ids: 32 lowercase hex digits of 16 random bytes, from os.urandom in 4 KiB batches
# (one getrandom() per 256 ids).

cdef enum:
    ID_BYTES = 16
    POOL_BYTES = 4096

cdef bytes _pool = b""
cdef Py_ssize_t _pool_pos = 0


def _reset_pool():
    # A forked worker must not hand out the ids its parent already buffered.
    global _pool, _pool_pos
    _pool = b""
    _pool_pos = 0


_register_at_fork(after_in_child=_reset_pool)


cdef bytes _new_id():
    global _pool, _pool_pos
    cdef const unsigned char* r
    cdef bytes out
    cdef char* w
    cdef int i
    if _pool_pos + ID_BYTES > PyBytes_GET_SIZE(_pool):
        _pool = _urandom(POOL_BYTES)
        _pool_pos = 0
    r = _ptr(_pool) + _pool_pos
    _pool_pos += ID_BYTES
    out = PyBytes_FromStringAndSize(NULL, 2 * ID_BYTES)
    w = PyBytes_AS_STRING(out)  # fresh and unshared: safe to fill in place
    for i in range(ID_BYTES):
        w[2 * i] = _HEX[r[i] >> 4]
        w[2 * i + 1] = _HEX[r[i] & 15]
    return out
