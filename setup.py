"""Cythonize ``cython_ext/`` into ``pyproxy._speedups`` (head helpers), ``pyproxy._balance`` (the
balancers' per-request arithmetic), ``pyproxy._cachehit`` (the HTTP cache's synchronous hit path)
and ``pyproxy._protocol`` (the data plane's protocol objects).

Everything else (metadata, the Rust extension via setuptools-rust) lives in pyproject.toml; this file
exists only because Cython extensions still need ``ext_modules``. ``PYPROXY_CYTHON_ANNOTATE=1`` writes
the HTML annotation next to the sources (uvloop's ``make debug`` pattern).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

annotate = os.environ.get("PYPROXY_CYTHON_ANNOTATE") == "1"

extensions = [
    Extension(
        "pyproxy._speedups",
        ["cython_ext/_speedups.pyx"],
        extra_compile_args=["-O3"],
    ),
    # The data plane's protocol objects: a module of its own because they import pyproxy.headers,
    # which imports _speedups (one module would import itself half-initialised).
    # The balancers' per-request arithmetic (bases of UpstreamServer and RoundRobin): a module of
    # its own because pyproxy.balance is imported by pyproxy.config, which _protocol imports.
    Extension(
        "pyproxy._balance",
        ["cython_ext/_balance.pyx"],
        extra_compile_args=["-O3"],
    ),
    # The HTTP cache's synchronous hit path (HttpCachePhase.lookup_now).
    Extension(
        "pyproxy._cachehit",
        ["cython_ext/_cachehit.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "pyproxy._protocol",
        ["cython_ext/_protocol.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        annotate=annotate,
        # where ``from pyproxy._balance cimport ...`` finds cython_ext/pyproxy._balance.pxd
        include_path=["cython_ext"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
