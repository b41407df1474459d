"""pyproxy: a high-performance HTTP reverse proxy for AI agent services, programmable in Python."""

__version__ = "0.1.0"


def _check_extension_version() -> None:
    # A stale extension left in a source tree half-works in confusing ways; refuse it (as polars does).
    from pyproxy import _core

    if _core.__version__ != __version__:
        raise ImportError(
            f"pyproxy._core is version {_core.__version__} but the package is {__version__}: "
            "rebuild it with `pip install -e .`"
        )


_check_extension_version()
