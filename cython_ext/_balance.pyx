# cython: language_level=3, autotestdict=False
"""The balancers' per-request arithmetic, compiled (``pyproxy._balance``).

Two base classes of the Python balancing code, holding what a request touches as C fields:

- :class:`ServerStats`, base of :class:`pyproxy.balance.upstream.UpstreamServer` (which documents
  the estimates): ``started``/``finished``, the in-flight count and the latency / error EWMAs;
- :class:`Rotation`, base of :class:`pyproxy.balance.algorithms.RoundRobin`: its ``pick``.

Same arithmetic, same order of float operations as the Python it replaced (the tests of
``pyproxy.balance`` hold it). The Python classes keep their API and everything that is not per
request. Why: each was a Python frame per request (started, finished, pick) plus a dozen attribute
lookups; as C methods over C fields they cost a fraction (see the commit for the measured effect).
"""

from libc.math cimport exp

ERROR_ALPHA = 0.05
"""Weight of one request in ``error_ewma``."""
AVG_ALPHA = 0.05
"""Weight of one request in ``avg``, the plain latency average dynamic weights follow."""

cdef double _ERROR_ALPHA = ERROR_ALPHA
cdef double _AVG_ALPHA = AVG_ALPHA


cdef class ServerStats:
    """One server's balancing state (the fields :class:`UpstreamServer` documents)."""

    cdef public object server
    cdef public str id
    cdef public double weight
    cdef public long long in_flight
    cdef public double ewma, error_ewma, avg, stamp, since, tau
    cdef public bint available

    cpdef started(self):
        """A request was sent to this server."""
        self.in_flight += 1

    cpdef finished(self, double latency, bint ok, double now):
        """A request sent to this server ended after ``latency`` seconds (``ok``: it succeeded)."""
        cdef double ewma = self.ewma, elapsed, w, avg, e
        if self.in_flight > 0:
            self.in_flight -= 1
        if latency > ewma:
            self.ewma = latency  # the peak: slowness is believed at once
        elif ok:
            elapsed = now - self.stamp  # +inf for the first sample → w = 0
            if elapsed > 0.0:
                w = exp(-elapsed / self.tau)
                self.ewma = ewma * w + latency * (1.0 - w)
        if now > self.stamp:
            self.stamp = now
        if ok or latency > self.avg:
            avg = self.avg
            self.avg = latency if avg == 0.0 else avg + _AVG_ALPHA * (latency - avg)
        e = self.error_ewma
        self.error_ewma = e + _ERROR_ALPHA * ((0.0 if ok else 1.0) - e)


cdef class Rotation:
    """Round robin over the available servers of ``_servers`` from ``_next`` on."""

    cdef public list _servers
    cdef public Py_ssize_t _next

    cpdef pick(self, request, now, exclude=()):
        """The next available server not in ``exclude``, or None."""
        cdef list servers = self._servers
        cdef Py_ssize_t n = len(servers), i = self._next, k
        cdef ServerStats s
        cdef bint check = bool(exclude)
        for k in range(n):
            if i >= n:
                i = 0
            s = servers[i]
            i += 1
            if s.available and (not check or s not in exclude):
                self._next = i
                return s
        return None
