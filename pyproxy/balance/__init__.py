"""Choosing an upstream server of a pool, and knowing which servers can take requests.

- :mod:`pyproxy.balance.algorithms` — the balancers (``round_robin``, ``random``,
  ``weighted_round_robin`` [optionally latency/error-driven], ``least_connections`` [power of two
  choices, peak EWMA], ``consistent_hash`` [bounded loads]), all with one ``pick()`` interface;
- :mod:`pyproxy.balance.upstream` — the run-time state of one server (in flight, EWMAs, slow start);
- :mod:`pyproxy.balance.health` — active HTTP health checks; :mod:`pyproxy.balance.outlier` —
  passive ejection of servers that fail;
- :mod:`pyproxy.balance.pool` — one pool at run time: all of the above plus the resilience pieces
  (:mod:`pyproxy.resilience`), as the data plane uses them.
"""
