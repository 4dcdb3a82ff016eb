"""The gateway's own histograms, read from its /metrics before and after the load."""

from __future__ import annotations

import math
from dataclasses import dataclass

import aiohttp

# The gateway's own histograms read from its /metrics, and the label that splits each.
SCRAPED = {
    "gateway_frame_forward_seconds": "direction",
    "gateway_gc_pause_seconds": "generation",
    "gateway_event_loop_lag_seconds": "",  # one series, no label
}

Buckets = dict[str, dict[float, float]]  # label value -> upper bound (s) -> cumulative count


async def scrape_histograms(gateway_url: str) -> dict[str, Buckets]:
    """The SCRAPED histograms from the gateway's GET /metrics ({} without /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway_url}/metrics") as response,
        ):
            if response.status != 200:
                return {}
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    found: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(text):
        label = SCRAPED.get(family.name)
        for sample in family.samples if label is not None else ():
            if sample.name == f"{family.name}_bucket":
                value = sample.labels.get(label, "")
                series = found.setdefault(family.name, {}).setdefault(value, {})
                series[float(sample.labels["le"])] = sample.value
    return found


@dataclass
class BucketSummary:
    """Quantiles as the histogram's bucket upper bounds (None: above the top bucket)."""

    n: int
    p50_le_ms: float | None
    p99_le_ms: float | None
    max_le_ms: float | None


def histogram_report(before: Buckets | None, after: Buckets | None) -> dict[str, BucketSummary]:
    """What one scraped histogram counted between two scrapes, per label value."""
    report = {}
    for value, counts in sorted((after or {}).items()):
        old = (before or {}).get(value, {})
        delta = {le: n - old.get(le, 0.0) for le, n in sorted(counts.items())}
        total = delta.get(math.inf, 0.0)
        report[value] = BucketSummary(
            int(total),
            _bucket_quantile(delta, total, 0.5),
            _bucket_quantile(delta, total, 0.99),
            _bucket_quantile(delta, total, 1.0),
        )
    return report


def _bucket_quantile(cumulative: dict[float, float], total: float, q: float) -> float | None:
    for le, count in cumulative.items():
        if total and count >= q * total:
            return None if math.isinf(le) else round(le * 1000, 3)
    return None
