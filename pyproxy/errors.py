"""pyproxy's exceptions: one hierarchy, tagged by category (as redis-py's ``redis.exceptions``).

``PyproxyError`` is declared once, in the compiled core, so the Rust and Python sides raise the same
class. Invalid arguments to the core structures raise the built-in ``TypeError`` / ``ValueError`` /
``LookupError`` that Python programmers expect, with messages naming the argument.
"""

from pyproxy._core import PyproxyError

__all__ = ["PyproxyError"]
