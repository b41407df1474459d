"""`pip wheel .` makes one wheel holding both extensions, stubs and py.typed, which installs into a
fresh virtual environment and imports there (outside the source tree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    "target", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.c", ".git", ".*cache*", ".venv*"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        # Reuse the tree's compiled Rust dependencies; the wheel is still built from the copy.
        env={**__import__("os").environ, "CARGO_TARGET_DIR": str(ROOT / "target")},
    )
    (whl,) = out.glob("pyproxy-*.whl")
    return whl


def test_wheel_contains_both_extensions_stubs_and_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("pyproxy/_core.") and n.endswith(".so") for n in names), names
    assert any(n.startswith("pyproxy/_speedups.") and n.endswith(".so") for n in names), names
    assert any(n.startswith("pyproxy/_protocol.") and n.endswith(".so") for n in names), names
    assert {"pyproxy/_core.pyi", "pyproxy/_speedups.pyi", "pyproxy/py.typed"} <= names
    # Every module of the package, subpackages included (a wheel without them cannot run the proxy).
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "pyproxy").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources and sources <= names, sorted(sources - names)


def test_wheel_installs_into_a_fresh_venv_and_imports(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], check=True)
    code = (
        "from pyproxy.core import LruCache, HashRing, SlidingWindow;"
        "import pyproxy._speedups, pyproxy, sys;"
        "c = LruCache(1000); c.set('k', b'v'); assert c.get('k') == b'v';"
        "r = HashRing(['a', 'b']); assert r.get('x') in ('a', 'b');"
        "assert SlidingWindow(1, 1.0).hit('u')[0];"
        "print(pyproxy.__file__)"
    )
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert str(venv) in out.stdout, "imported from the venv, not the source tree"
    version = subprocess.run([str(venv / "bin" / "pyproxy"), "--version"], check=True, capture_output=True, text=True)
    assert version.stdout.strip() == "pyproxy 0.1.0"
