"""Same-run comparisons: time ours and the anchors in alternated rounds, report median ratios.

These machines are shared and noisy, so absolute timings mean little. Every benchmark here runs our
implementation and its anchors in the same process, alternating them round by round (so a slow spell
hits all of them), takes the median per-operation time of each, and reports ``ours / anchor``
(< 1 means we are faster). ``report`` prints the table and returns the ratios for assertions and for
``benchmark.extra_info``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

# One "case" is a zero-argument callable doing ``ops`` operations per call.
Case = Callable[[], object]


@dataclass
class Comparison:
    """Median seconds per operation for each case, measured in alternated rounds."""

    title: str
    per_op: dict[str, float] = field(default_factory=dict)
    rounds: int = 0

    def ratio(self, ours: str, anchor: str) -> float:
        return self.per_op[ours] / self.per_op[anchor]

    def table(self, ours: str) -> str:
        width = max(len(n) for n in self.per_op)
        lines = [f"{self.title}  (median of {self.rounds} alternated rounds)"]
        lines.append(f"  {'case':<{width}}  {'ns/op':>10}  {'ours/case':>9}")
        for name, t in self.per_op.items():
            lines.append(f"  {name:<{width}}  {t * 1e9:>10.1f}  {self.per_op[ours] / t:>9.3f}")
        return "\n".join(lines)


def calls(fn: Callable[..., object], args: list[Any], *extra: object) -> Case:
    """A case calling ``fn(arg)`` (or ``fn(arg, extra)``) for each of ``args``, results dropped.

    The loop has no ``*`` unpacking when there is no extra argument: that alone costs more than a
    ring lookup.
    """
    if not extra:

        def run() -> None:
            for a in args:
                fn(a)

        return run
    (x,) = extra

    def run_extra() -> None:
        for a in args:
            fn(a, x)

    return run_extra


def compare(
    title: str,
    cases: dict[str, Case],
    *,
    ops: int,
    rounds: int = 7,
    min_round_seconds: float = 0.05,
) -> Comparison:
    """Time each case ``rounds`` times, alternating, and keep the median per-operation time.

    Each round calls a case repeatedly until ``min_round_seconds`` has passed (at least once), so
    fast and slow cases get comparable sample sizes. GC is disabled while timing.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: caches, lazy imports, branch predictors
        fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            # Rotate the starting case each round so no case always runs right after another.
            names = list(cases)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                fn = cases[name]
                calls = 0
                start = time.perf_counter()
                while True:
                    fn()
                    calls += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_round_seconds:
                        break
                samples[name].append(elapsed / (calls * ops))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Comparison(
        title, {n: statistics.median(s) for n, s in samples.items()}, rounds
    )


def report(comparison: Comparison, ours: str, benchmark: object | None = None) -> dict[str, float]:
    """Print the table and return ``{anchor: ours/anchor}``; also stored in ``benchmark.extra_info``."""
    print("\n" + comparison.table(ours))
    ratios = {
        name: comparison.ratio(ours, name) for name in comparison.per_op if name != ours
    }
    extra = getattr(benchmark, "extra_info", None)
    if isinstance(extra, dict):
        extra[comparison.title] = {
            "ns_per_op": {n: t * 1e9 for n, t in comparison.per_op.items()},
            "ratio_ours_over": ratios,
        }
    return ratios


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``: the sample at that rank, no interpolation."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
