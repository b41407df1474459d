# cython: language_level=3, autotestdict=False
"""The HTTP cache's synchronous fast path, compiled: ``HttpCachePhase.lookup_now``.

A fresh response in this worker's memory for a plain GET or HEAD is answered without awaiting,
from a parsed copy kept beside the stored record (:class:`Ready`). The rules are the phase's own
(``pyproxy/cache/phase.py`` documents them and takes every other request the slow way); this
module only runs them as C: typed arithmetic for ``Age`` and freshness, a byte compare for the
request fields that need the full rules, and the answer itself built once per second of age (its
``Age`` and ``Cache-Status`` fields change no faster) and handed out again until then.

Each hit also feeds cache warming (``pyproxy/cache/warming.py`` documents it): its key's decayed
hit count (:class:`HitCounts`, kept here so the hit path stays in C) and :func:`warm`.

``pyproxy.cache.phase`` binds :func:`lookup_now` and :func:`warm` as its methods, builds
:class:`Ready` and keeps a :class:`HitPath` (what the hit path reads of it).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport exp, floor, log

from pyproxy._protocol import Answer as _Answer  # what the data plane sends as it is
from pyproxy.cache.http import primary_key as _primary_key, vary_key as _vary_key

READY_MAX = 4096
"""Stored responses kept parsed for the fast path, and request memos (each cleared when full)."""

cdef Py_ssize_t _READY_MAX = READY_MAX
cdef double _DELTA_MAX = 2147483648.0  # 2^31 seconds: the largest delta-seconds a cache must keep


@cython.auto_pickle(False)  # worker state: nothing to pickle it for
@cython.final
cdef class HitCounts:
    """Exponentially decayed hit counts per key (``count × 2^(−Δt / half_life) + 1`` per hit),
    for at most ``max_keys`` keys (the coldest half goes when full)."""

    cdef readonly double rate
    cdef readonly Py_ssize_t max_keys
    cdef dict _counts  # key → (count, when)

    def __init__(self, double half_life, Py_ssize_t max_keys=100_000):
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        self.rate = log(2.0) / half_life
        self.max_keys = max_keys
        self._counts = {}

    cpdef double hit(self, key, double now):
        """Count a hit of ``key`` at ``now``; its decayed count, this hit included."""
        cdef double count = self.count(key, now) + 1.0
        self._counts[key] = (count, now)
        if len(self._counts) > self.max_keys:
            self._forget_coldest(now)
        return count

    cpdef double count(self, key, double now):
        """``key``'s decayed count at ``now``."""
        known = self._counts.get(key)
        if known is None:
            return 0.0
        cdef double count = (<tuple>known)[0]
        cdef double when = (<tuple>known)[1]
        return count * exp(-self.rate * max(0.0, now - when))

    def set(self, key, double count, double now):
        """Set ``key``'s count as of ``now`` (a warm start's counts)."""
        self._counts[key] = (count, now)

    def hottest(self, Py_ssize_t n, double now):
        """The ``n`` hottest ``(key, count)`` at ``now``, hottest first."""
        ranked = sorted([(k, self.count(k, now)) for k in self._counts], key=lambda kc: -kc[1])
        return ranked[:n]

    def __len__(self):
        return len(self._counts)

    cdef _forget_coldest(self, double now):
        self._counts = {k: (c, now) for k, c in self.hottest(self.max_keys // 2, now)}


@cython.auto_pickle(False)  # holds a memory tier's record by identity
@cython.final
cdef class Ready:
    """A stored response in memory, parsed once: what a fresh hit needs, nothing else.

    ``record`` is the memory tier's object it was parsed from (identity: still the stored one);
    ``initial_age`` the corrected initial age (RFC 9111 §4.2.3); ``stored`` the ``StoredResponse``
    (a refresh-ahead needs its validators); ``head`` the status line and stored fields serialized
    once, without the final blank line.
    """

    cdef readonly object record
    cdef readonly int status
    cdef readonly tuple fields
    cdef readonly object body
    cdef readonly double lifetime, initial_age, response_time
    cdef readonly object stored
    cdef readonly bytes head
    # The answers last built, for this whole second of age and of ttl (GET and HEAD).
    cdef long long _age, _ttl
    cdef object _get, _head

    def __init__(self, record, int status, tuple fields, body, double lifetime, double initial_age,
                 double response_time, stored, bytes head):
        self.record = record
        self.status = status
        self.fields = fields
        self.body = body
        self.lifetime = lifetime
        self.initial_age = initial_age
        self.response_time = response_time
        self.stored = stored
        self.head = head
        self._age = self._ttl = -1

    def __repr__(self):
        return f"Ready(status={self.status}, lifetime={self.lifetime}, fields={self.fields!r})"

    cdef object answer(self, bint head_only, double age, double ttl):
        """The ``Answer`` for a hit at ``age`` with ``ttl`` left (seconds, ``ttl > 0``)."""
        # Whole seconds (Age truncated, as b"%d" % age; ttl rounded down), capped at 2^31 as RFC 9111
        # §1.2.2 caps delta-seconds: a C conversion of a larger double is undefined.
        cdef long long whole_age = <long long>min(age, _DELTA_MAX)
        cdef long long whole_ttl = <long long>floor(min(ttl, _DELTA_MAX))
        if whole_age != self._age or whole_ttl != self._ttl:
            self._age, self._ttl = whole_age, whole_ttl
            self._get = self._head = None
        got = self._head if head_only else self._get
        if got is not None:
            return got
        age_field = b"%d" % whole_age
        status_field = b"pyproxy; hit; ttl=%d; detail=memory" % whole_ttl
        fields = [*self.fields, (b"Age", age_field), (b"Cache-Status", status_field)]
        head = b"".join((self.head, b"Age: ", age_field, b"\r\nCache-Status: ", status_field, b"\r\n"))  # one copy
        if head_only:
            got = self._head = _Answer(self.status, fields, b"", "memory", length=len(self.body), head=head)
        else:
            got = self._get = _Answer(self.status, fields, self.body, "memory", head=head)
        return got


cdef inline bint _same_lower(const char* p, const char* lower, Py_ssize_t n) noexcept:
    """``p[:n]``, ASCII case folded, equals ``lower``."""
    cdef Py_ssize_t i
    cdef char c
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:  # A-Z
            c += 32
        if c != lower[i]:
            return False
    return True


cdef bint _needs_full_rules(object name):
    """A request field that takes the request off the fast path: a request directive, a
    conditional or credentials (``Cache-Control``, ``Pragma``, ``Authorization``,
    ``If-None-Match``, ``If-Modified-Since``)."""
    if type(name) is not bytes:
        return True  # not what the data plane hands over: let the full path judge
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    cdef const char* p = PyBytes_AS_STRING(name)
    if n == 13:
        return (_same_lower(p, b"cache-control", 13) or _same_lower(p, b"authorization", 13)
                or _same_lower(p, b"if-none-match", 13))
    if n == 6:
        return _same_lower(p, b"pragma", 6)
    if n == 17:
        return _same_lower(p, b"if-modified-since", 17)
    return False


@cython.auto_pickle(False)
@cython.final
cdef class HitPath:
    """What :func:`lookup_now` reads of its phase, as C fields: the phase's containers (shared,
    not copied), its memory tier's LRU and hit counter, its clock, and the warming settings. The
    phase makes a new one whenever any of them changes (``HttpCachePhase._hit_path``)."""

    cdef object phase, lru, tier_stats, clock
    cdef dict policies, keys, ready, counters, prefetched
    cdef HitCounts hits
    cdef bint refresh_ahead, predict
    cdef double hot_hits, refresh_before

    def __init__(self, phase, memory, tier_stats):
        warming = phase.warming
        self.phase = phase
        self.lru = memory.lru if memory is not None else None
        self.tier_stats = tier_stats
        self.clock = phase.clock
        self.policies = phase.policies
        self.keys = phase._keys
        self.ready = phase._ready
        self.counters = phase.counters
        self.prefetched = phase._prefetched
        self.hits = phase.hits
        self.refresh_ahead = warming.refresh_ahead
        self.predict = warming.predict
        self.hot_hits = warming.hot_hits
        self.refresh_before = warming.refresh_before

    cdef object ready_for(self, key, policy):
        """The parsed copy of what memory holds for ``key`` (parsed now if the record changed)."""
        record = self.lru.get(key)
        if record is None:
            return None
        ready = self.ready.get(key)
        if ready is None or ready.record is not record:
            ready = self.phase._prepare(key, record, policy)
        return ready


def lookup_now(self, str route, bytes method, str scheme, bytes host, bytes target, list headers, str client=""):
    """The fast path, without awaiting: a fresh response in this worker's memory for a plain
    GET/HEAD (no request directives, conditionals or credentials; ``Vary`` variants included),
    answered from a parsed copy kept beside it. ``None``: take ``lookup`` (everything else, same
    rules)."""
    cdef bint head_only
    cdef Ready ready
    cdef double age, ttl, now
    cdef HitPath path = self._hit_path
    if path.lru is None:
        return None
    policy = path.policies.get(route)
    if policy is None or not policy.enabled:
        return None
    if method == b"GET":
        head_only = False
    elif method == b"HEAD":
        head_only = True
    else:
        return None
    for field in headers:
        if _needs_full_rules((<tuple>field)[0]):
            return None
    keys = path.keys
    memo = (route, scheme, host, target)
    key = keys.get(memo)
    if key is None:
        key = _primary_key(scheme, host, target, policy)
        if len(keys) >= _READY_MAX:
            keys.clear()
        keys[memo] = key
    found = path.ready_for(key, policy)
    if type(found) is not Ready:
        if found is None:
            return None
        # The key varies: the request's values of the named fields pick the stored variant.
        key = _vary_key(key, found.names, headers)
        found = path.ready_for(key, policy)
        if type(found) is not Ready:
            return None  # a variant that is itself a variant map: never stored that way
    ready = <Ready>found
    now = path.clock()
    age = ready.initial_age + max(0.0, now - ready.response_time)
    ttl = ready.lifetime - age
    if ttl <= 0:
        return None  # stale: revalidation, stale-while-revalidate... on the full path
    counters = path.counters
    counters["hit"] = counters.get("hit", 0) + 1
    path.tier_stats.hits += 1
    _warm(path, route, scheme, host, target, headers, client, key, ready.stored, ttl, ready.lifetime, now)
    return ready.answer(head_only, age, ttl)


def warm(self, str route, str scheme, bytes host, bytes target, headers, str client, key, stored,
         double ttl, double lifetime):
    """``HttpCachePhase._warm``: a fresh hit counts for its key, a prefetch that paid off is noted,
    a hot entry is refreshed ahead of its expiry, and what this client asks next is predicted."""
    cdef HitPath path = self._hit_path
    _warm(path, route, scheme, host, target, headers, client, key, stored, ttl, lifetime, path.clock())


cdef _warm(HitPath path, str route, str scheme, bytes host, bytes target, headers, str client, key, stored,
           double ttl, double lifetime, double now):
    cdef double count = path.hits.hit(key, now)
    prefetched = path.prefetched
    if prefetched and prefetched.pop(key, False) is None:
        counters = path.counters
        counters["prefetch_used"] = counters.get("prefetch_used", 0) + 1
    if path.refresh_ahead and count >= path.hot_hits and 0 < ttl < path.refresh_before * lifetime:
        path.phase._fetch(route, scheme, host, target, headers, key, stored, "refresh_ahead")
    if path.predict and client:  # _predict's first test, here too: a Python call less per hit
        path.phase._predict(route, scheme, host, target, headers, client, key)
