"""p50, p95, p99 and max of a set of samples, with the project's one percentile."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.stats import percentile


@dataclass
class Summary:
    n: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Summary:
        # Sorted once here; `percentile` sorts again, which on sorted data is one pass.
        data = sorted(float(v) for v in values if v is not None)
        if not data:
            return cls(0)
        p50, p95, p99 = (round(_at(data, q), 2) for q in (50, 95, 99))
        return cls(len(data), p50, p95, p99, round(data[-1], 2))

    @classmethod
    def of_counts(cls, counts: Mapping[int, int]) -> Summary:
        """From a histogram of whole milliseconds."""
        return cls.of(float(ms) for ms in sorted(counts) for _ in range(counts[ms]))


def _at(data: list[float], q: float) -> float:
    value = percentile(data, q)
    assert value is not None  # `data` is not empty
    return value
