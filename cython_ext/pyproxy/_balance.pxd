# The C interface of pyproxy._balance (cython_ext/_balance.pyx), for the data plane
# (_protocol.pyx cimports it): its per-request calls on a pool and a server are then C calls
# and C field reads instead of method lookups by name. At the module's qualified path under
# cython_ext/ (setup.py's include_path) so that ``from pyproxy._balance cimport ...`` finds it.

cdef class ServerStats:
    cdef public object server
    cdef public str id
    cdef public double weight
    cdef public long long in_flight
    cdef public double ewma, error_ewma, avg, stamp, since, tau
    cdef public bint available

    cpdef started(self)
    cpdef finished(self, double latency, bint ok, double now)


cdef class Rotation:
    cdef public list _servers
    cdef public Py_ssize_t _next

    cpdef pick(self, request, now, exclude=*)


cdef class BucketCounter:
    cdef double _per_second
    cdef Py_ssize_t _n
    cdef long long* _a
    cdef long long* _b
    cdef long long _epoch
    cdef Py_ssize_t _index
    cdef public long long a, b

    cpdef advance(self, double now)
    cpdef add(self, double now, long long da, long long db)
    cdef void _roll(self, long long epoch) noexcept
    cpdef void clear(self) noexcept


cdef class BudgetWindow:
    cdef public BucketCounter _window

    cpdef record_request(self, double now)


cdef class PoolCore:
    cdef public object balancer, outlier, _recent, _recent_at
    cdef public dict states
    cdef public bint _plain
    # set by UpstreamPool: its retry budget, and whether the pool has no concurrency limit
    cdef public BudgetWindow retry_budget
    cdef public bint unlimited

    cpdef choose(self, request, double now, tried)
    cpdef finished(self, ServerStats server, double latency, ok, bint connect_failure, double now)
