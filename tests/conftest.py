"""Shared test set-up: make the pure-Python models in this folder importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
