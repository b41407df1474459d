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

cimport cython
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.math cimport exp

ERROR_ALPHA = 0.05
"""Weight of one request in ``error_ewma``."""
AVG_ALPHA = 0.05
"""Weight of one request in ``avg``, the plain latency average dynamic weights follow."""

from collections import deque as _deque

# deque.append, looked up once: calling it on UpstreamPool's _recent deques skips a method lookup
# by name per call
cdef object _deque_append = _deque.append
cdef double _ERROR_ALPHA = ERROR_ALPHA
cdef double _AVG_ALPHA = AVG_ALPHA


cdef class ServerStats:
    """One server's balancing state (the fields :class:`UpstreamServer` documents; declared in
    ``pyproxy._balance.pxd`` with the other classes' fields)."""

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


@cython.auto_pickle(False)  # C arrays: nothing to pickle them by
cdef class BucketCounter:
    """Two rolling counters, ``a`` and ``b`` (say requests and failures), over ``window`` seconds
    cut into ``buckets`` slots (:mod:`pyproxy.resilience._buckets` documents the ring)."""

    # fields (in the .pxd): _per_second, _n; _a, _b (the ring); _epoch, the absolute slot number
    # (now // width) of the newest slot; _index, its position in the ring (_epoch % _n); a, b,
    # the totals over the window

    def __cinit__(self, window: float, buckets: int = 10):
        self._a = self._b = NULL

    def __init__(self, window: float, buckets: int = 10) -> None:
        if not window > 0.0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets!r}")
        # Slot number = now × buckets / window: a multiplication, exact for round numbers where
        # now // (window / buckets) is not (1001.5 // 0.1 == 10014.0).
        self._per_second = buckets / window
        self._n = buckets
        PyMem_Free(self._a)
        PyMem_Free(self._b)
        self._a = <long long*>PyMem_Calloc(buckets, sizeof(long long))
        self._b = <long long*>PyMem_Calloc(buckets, sizeof(long long))
        if self._a == NULL or self._b == NULL:
            raise MemoryError()
        self._epoch = 0
        self._index = 0
        self.a = 0
        self.b = 0

    def __dealloc__(self):
        PyMem_Free(self._a)
        PyMem_Free(self._b)

    cpdef advance(self, double now):
        """Move the newest slot to ``now``, dropping the slots that left the window."""
        cdef long long epoch = <long long>(now * self._per_second)  # monotonic time is positive: truncation is floor
        if epoch > self._epoch:  # else the same slot (the common case) or a stale clock reading
            self._roll(epoch)

    cpdef add(self, double now, long long da, long long db):
        """Count ``da`` and ``db`` events at ``now``."""
        cdef long long epoch = <long long>(now * self._per_second)
        if epoch > self._epoch:
            self._roll(epoch)
        self._a[self._index] += da
        self._b[self._index] += db
        self.a += da
        self.b += db

    cdef void _roll(self, long long epoch) noexcept:
        cdef Py_ssize_t n = self._n, i = self._index
        cdef long long gap = epoch - self._epoch, k
        if gap >= n:  # idle for a whole window: everything expired
            self.clear()
        else:
            for k in range(gap):
                i += 1
                if i == n:
                    i = 0
                self.a -= self._a[i]
                self.b -= self._b[i]
                self._a[i] = 0
                self._b[i] = 0
        self._epoch = epoch
        self._index = epoch % n

    cpdef void clear(self) noexcept:
        """Forget every event (the ring keeps its position)."""
        cdef Py_ssize_t i
        for i in range(self._n):
            self._a[i] = 0
            self._b[i] = 0
        self.a = 0
        self.b = 0


cdef class BudgetWindow:
    """The per-request part of :class:`pyproxy.resilience.budget.RetryBudget` (its base): the
    window of original requests (``a``) and retries (``b``)."""

    cpdef record_request(self, double now):
        """Count one original request (not a retry)."""
        self._window.add(now, 1, 0)


cdef class PoolCore:
    """The two per-request calls of :class:`pyproxy.balance.pool.UpstreamPool` (its base, which
    documents them and holds everything else): ``choose`` on its common path and ``finished``."""

    cpdef choose(self, request, double now, tried):
        """A server for ``request`` other than those in ``tried``, or ``None``."""
        balancer = self.balancer
        if not tried and self._plain:
            # The common case: first try, no per-server limit nor breakers to ask.
            if isinstance(balancer, Rotation):
                server = (<Rotation>balancer).pick(request, now, ())  # a C call
            else:
                server = balancer.pick(request, now, ())
            if server is not None:
                return server
        return self._choose_among(request, now, tried)

    cpdef finished(self, ServerStats server, double latency, ok, bint connect_failure, double now):
        """The outcome of one request to ``server`` (``ok=None``: no verdict)."""
        if ok is None:
            if server.in_flight > 0:
                server.in_flight -= 1
        else:
            server.finished(latency, ok, now)
            if ok:
                _deque_append(self._recent, latency)
                _deque_append(self._recent_at, now)
        st = self.states.get(server.id)
        if st is None:
            return
        breaker = st.breaker
        if breaker is not None:
            if ok is None:
                breaker.release_probe()
            else:
                breaker.record(ok, now)
                self._update(st, now)  # opened (unavailable until retry_at) or closed again
        if self.outlier is not None and ok is not None:
            self.outlier.record(server.id, ok, connect_failure, now)
        if st.removed_when_idle and server.in_flight == 0:
            self._remove(st)
