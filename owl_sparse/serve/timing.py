"""Timing decode speeds side by side on a machine whose speed drifts.

A shared CPU can slow down or speed up by tens of percent within minutes, so two decodes
timed minutes apart say little about which contender is faster.  `interleaved_rounds`
times each contender once per round, the order rotating, and `paired_ratio` compares two
contenders by the median of their per-round ratios.  The demo and
``benchmarks/decode_rounds.py`` both use them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved_rounds(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """One untimed warm-up call of each contender (it compiles its step), then ``rounds``
    rounds of one call each, the order rotated by one every round.

    Args:
        runs: name -> a function that decodes once and returns its tokens/s.
        rounds: rounds to time (>= 1).

    Returns:
        name -> tokens/s of each round, in round order.
    """
    names = list(runs)
    for name in names:
        runs[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(float(runs[name]()))
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[i] / b[i]`` (rounds where ``b`` is 0 left out; nan
    when none is left)."""
    ratios = [x / y for x, y in zip(a, b) if y]
    return statistics.median(ratios) if ratios else float("nan")
