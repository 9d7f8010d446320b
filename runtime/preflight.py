"""What the dataset pre-flights of the benchmarks and of pretraining share.

A pre-flight runs before training and stops a run on data that would fail (or silently mislead)
hours later inside a DataLoader worker. It is cheap by design: every file is stat'ed and its
header opened, but only a seeded sample is decoded in full (all of a small split).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

DEFAULT_SAMPLE = 32       # full decodes per split
FULL_CHECK_BELOW = 500    # a split this small is decoded entirely (demo and toy sets)
DEFAULT_MAX_HEADERS = 50_000  # headers opened per split; beyond, a seeded sample (ImageNet train)


def sample_indices(count: int, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                   full_below: int = FULL_CHECK_BELOW) -> list[int]:
    """Sorted item indices to check in full: all of them when ``count <= full_below`` (small sets
    are checked entirely), else ``min(sample, count)`` drawn without replacement by a Generator
    seeded with ``seed`` (the same items on every run, so a result is reproducible)."""
    if count <= full_below or sample >= count:
        return list(range(count))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(count, size=max(0, sample), replace=False))


@dataclass
class PreflightReport:
    """What a pre-flight of one split checked (all of it passed, or it would have raised)."""

    name: str
    items: int
    files_stated: int = 0
    headers: int = 0
    decoded: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)

    def done(self) -> "PreflightReport":
        self.seconds = time.perf_counter() - self.started
        return self

    def summary(self) -> str:
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"[preflight] {self.name}: {self.items} items, {self.files_stated} files found, "
                f"{self.headers} headers read, {self.decoded} fully decoded{extra} ({self.seconds:.1f} s)")


__all__ = ["DEFAULT_SAMPLE", "FULL_CHECK_BELOW", "DEFAULT_MAX_HEADERS", "sample_indices", "PreflightReport"]
