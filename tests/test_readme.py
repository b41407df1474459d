"""The README's Python example runs as written (so the documented API stays true)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_core_library_example_runs() -> None:
    blocks = [b for b in _blocks() if "pyproxy.core" in b]
    assert blocks, "the README has a core-library example"
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
        assert "cache" in namespace and "ring" in namespace


def test_cache_library_example_runs() -> None:
    blocks = [b for b in _blocks() if "pyproxy.cache" in b]
    assert blocks, "the README has a cache-library example"
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - its asserts check the results
        assert "main" in namespace
