# cython: language_level=3, autotestdict=False
"""HTTP/1.1 head helpers, compiled: the data plane's twin of ``pyproxy.headers``' ``py_*`` functions.

Same names, signatures, outputs and exceptions as the plain-Python reference in
``pyproxy/headers.py`` (which documents the rules and re-exports these functions); the tests hold
the two against each other. The work is byte loops over ``const unsigned char*`` with 256-entry
lookup tables, writing the head into one buffer (stack first, heap when it outgrows it) that
becomes the result ``bytes`` with a single copy.

Errors: bad bytes raise ``pyproxy.headers.HeaderError``, built by the reference module's own error
constructors so that both implementations word them identically; that module is imported on the
first error only, because it imports this one.
"""

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

from http import HTTPStatus as _HTTPStatus
from os import register_at_fork as _register_at_fork, urandom as _urandom

include "tables.pxi"
include "buffer.pxi"
include "fields.pxi"
include "request_id.pxi"
include "rewrite.pxi"
include "api.pxi"
