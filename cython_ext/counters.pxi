# One worker's metrics counters, compiled (included by _protocol.pyx; re-exported by
# pyproxy.observe.metrics, which publishes their snapshots and renders them).
#
# Counting is on every request's path: as plain Python (a defaultdict update keyed by a tuple and a
# bisect per histogram) it cost ~7% of the proxy's CPU per request. Here a histogram is a C array
# and a status count an index into one; only the dictionary that finds a route's counters remains.

from libc.string cimport memset

# Histogram upper bounds in seconds (the +Inf bucket is implied). Mirrors metrics.BUCKETS.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
cdef int _NBOUNDS = 15
cdef double _BOUNDS[15]
for _i, _b in enumerate(BUCKETS):
    _BOUNDS[_i] = _b


cdef class Histogram:
    """Counts per bucket (``le`` bound, +Inf last), sum and count of observed seconds."""

    cdef double counts[16]
    cdef double total
    cdef double n

    cdef void observe(self, double seconds):
        cdef int i = 0
        while i < _NBOUNDS and _BOUNDS[i] < seconds:  # bisect_left: the first bound >= seconds
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def as_list(self) -> list[float]:
        """``[count per bucket..., +Inf, sum, count]`` (the snapshot format)."""
        return [self.counts[i] for i in range(_NBOUNDS + 1)] + [self.total, self.n]


cdef class _StatusCounts:
    """Answered requests of one (route, pool) by status code (100-599; others count as 0)."""

    cdef long long by_status[600]

    def __cinit__(self):
        memset(self.by_status, 0, sizeof(self.by_status))

    cdef void add(self, int status):
        self.by_status[status if 100 <= status < 600 else 0] += 1

    def items(self) -> list[tuple[int, int]]:
        return [(code, self.by_status[code]) for code in range(600) if self.by_status[code]]


cdef class _Connections:
    """Upstream connections of one pool: opened and reused (counted per request: C fields, not a
    (pool, kind) tuple key built and hashed each time)."""
    cdef long long new, reused


cdef Histogram _histogram(dict table, str name):
    found = table.get(name)
    if found is None:
        found = table[name] = Histogram()
    return <Histogram>found


cdef class WorkerMetrics:
    """One worker's counters; :meth:`snapshot` turns them into plain (JSON-able) data."""

    cdef dict _requests           # (route, pool) -> _StatusCounts
    cdef dict _request_duration   # route -> Histogram
    cdef dict _upstream_duration  # pool -> Histogram
    cdef dict _upstream_connections  # pool -> _Connections
    cdef dict _refused            # status -> count
    # The last route's entries of _requests and _request_duration: requests of one route come
    # in runs, and its name and pool are the same str objects each time (RouteFacts').
    cdef object _last_route, _last_pool
    cdef _StatusCounts _last_counts
    cdef Histogram _last_duration
    cdef public long long connections_total, connections_open, in_flight

    def __init__(self) -> None:
        self._requests = {}
        self._request_duration = {}
        self._upstream_duration = {}
        self._upstream_connections = {}
        self._refused = {}
        self.connections_total = self.connections_open = self.in_flight = 0

    cpdef request_done(self, str route, str pool, int status, double seconds):
        """A request was answered (``route``/``pool`` empty when the proxy answered before routing)."""
        if route is not self._last_route or pool is not self._last_pool:
            key = (route, pool)
            found = self._requests.get(key)
            if found is None:
                found = self._requests[key] = _StatusCounts()
            self._last_counts = <_StatusCounts>found
            self._last_duration = _histogram(self._request_duration, route)
            self._last_route = route
            self._last_pool = pool
        self._last_counts.add(status)
        self._last_duration.observe(seconds)

    cpdef upstream_answered(self, str pool, double seconds):
        """A response head came from ``pool`` ``seconds`` after the request went out."""
        _histogram(self._upstream_duration, pool).observe(seconds)

    cpdef upstream_connection(self, str pool, bint reused):
        cdef _Connections counts = self._upstream_connections.get(pool)
        if counts is None:
            counts = self._upstream_connections[pool] = _Connections()
        if reused:
            counts.reused += 1
        else:
            counts.new += 1

    cpdef refused_request(self, int status):
        self._refused[status] = self._refused.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain data of every counter (the format :func:`pyproxy.observe.metrics.merge` sums)."""
        return {
            "requests": [
                [route, pool, str(code), value]
                for (route, pool), counts in self._requests.items()
                for code, value in (<_StatusCounts>counts).items()
            ],
            "request_duration": {k: (<Histogram>h).as_list() for k, h in self._request_duration.items()},
            "upstream_duration": {k: (<Histogram>h).as_list() for k, h in self._upstream_duration.items()},
            "upstream_connections": [
                [pool, kind, value]
                for pool, counts in self._upstream_connections.items()
                for kind, value in (("new", (<_Connections>counts).new), ("reused", (<_Connections>counts).reused))
                if value
            ],
            "refused": {str(k): v for k, v in self._refused.items()},
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "in_flight": self.in_flight,
        }
