"""The compiled core structures, as a public library.

``from pyproxy.core import LruCache, HashRing, SlidingWindow, SharedWindows`` — implemented in Rust
(``pyproxy._core``); see each class's docstring and the README for the API.
"""

from pyproxy._core import (
    ENTRY_OVERHEAD,
    ChargePlan,
    HashRing,
    LruCache,
    SharedWindows,
    SlidingWindow,
    Tally,
    hit_all,
)

__all__ = [
    "ENTRY_OVERHEAD",
    "ChargePlan",
    "HashRing",
    "LruCache",
    "SharedWindows",
    "SlidingWindow",
    "Tally",
    "hit_all",
]
