"""What the benchmarks here share: running competing measurements interleaved."""

from __future__ import annotations


def interleaved(measures: dict, repeats: int) -> dict[str, list]:
    """Call every measure once per repetition, reversing their order every other one, so
    that none always runs first (warmer or colder caches, clocks, allocator); returns each
    one's results."""
    names = list(measures)
    results: dict = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(measures[name]())
    return results
