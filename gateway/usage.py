"""What the model costs: a price table (config/prices.toml) applied to stored usage."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MILLION = 1_000_000


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens (the Realtime models), per 1,000 characters (ElevenLabs'), or per
    minute of session (GPT-Live's)."""

    text_in: float = 0.0
    text_out: float = 0.0
    audio_in: float = 0.0
    audio_out: float = 0.0
    cached_in: float = 0.0
    per_1k_characters: float = 0.0
    per_minute: float = 0.0


class PriceTableError(ValueError):
    pass


def load_prices(path: Path) -> dict[str, Prices]:
    """Model -> prices; a missing file is an empty table (costs show as unknown)."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return {model: Prices(**values) for model, values in data.get("models", {}).items()}
    except (tomllib.TOMLDecodeError, TypeError) as err:
        raise PriceTableError(f"{path}: {err}") from err


def cost_usd(prices: Prices | None, row: dict[str, Any]) -> float | None:
    """Cost of one usage row (input/output tokens with their audio shares)."""
    if prices is None:
        return None
    audio_in = row.get("input_audio_tokens", 0)
    audio_out = row.get("output_audio_tokens", 0)
    text_in = max(0, row.get("input_tokens", 0) - audio_in)
    text_out = max(0, row.get("output_tokens", 0) - audio_out)
    total = (
        text_in * prices.text_in
        + audio_in * prices.audio_in
        + text_out * prices.text_out
        + audio_out * prices.audio_out
    )
    characters = row.get("characters") or 0
    minutes = (row.get("session_seconds") or 0) / 60
    return (
        total / MILLION + characters * prices.per_1k_characters / 1000 + minutes * prices.per_minute
    )


def priced(
    rows: list[dict[str, Any]], prices: dict[str, Prices], default_model: str
) -> float | None:
    """Adds `cost_usd` to each per-model usage row; returns the total, None if a model has
    no price (a total that leaves a model out would understate the spend)."""
    for row in rows:
        row["cost_usd"] = cost_usd(prices.get(row["model"] or default_model), row)
    costs = [row["cost_usd"] for row in rows]
    return None if any(c is None for c in costs) else round(sum(costs), 6)


def token_counts(usage: dict[str, Any]) -> dict[str, int]:
    """The store's usage columns from a Realtime `response.done.usage`."""
    details_in = usage.get("input_token_details") or {}
    details_out = usage.get("output_token_details") or {}
    return {
        "input_tokens": usage.get("input_tokens") or 0,
        "output_tokens": usage.get("output_tokens") or 0,
        "input_audio_tokens": details_in.get("audio_tokens") or 0,
        "output_audio_tokens": details_out.get("audio_tokens") or 0,
    }
