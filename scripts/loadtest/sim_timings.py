"""The Realtime simulator's own timings, to take its latency out of the gateway's share."""

from __future__ import annotations

from typing import Any

import aiohttp

from .callers import CallResult
from .summary import Summary


async def fetch_sim_timings(simulator_url: str) -> list[dict[str, Any]]:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{simulator_url}/sim/timings") as response,
        ):
            return await response.json() if response.status == 200 else []
    except aiohttp.ClientError:
        return []


def share_with_sim_measured(
    results: list[CallResult], sessions: list[dict[str, Any]], first_audio_ms: float
) -> tuple[Summary, Summary]:
    """The share with the simulator's own latency subtracted instead of F, per turn.

    The simulator dates each response on the clock this process shares: created when its
    VAD took the stop frame, first audio when it handed the first delta to its socket.
    What that takes beyond F (timer slack, its queue) is its own, not the gateway's. The
    sessions are matched to calls by the call_sid the gateway puts in the greeting's
    metadata, and a turn to the first response created after its stop frame left.
    Turns without a match (no metadata, a session swapped mid-call) are left out.
    """
    by_call: dict[str, list[tuple[float, float]]] = {}
    for session in sessions:
        call_sid = session.get("metadata", {}).get("call_sid")
        timed = [(r["created_at"], r["first_audio_at"]) for r in session["responses"]
                 if r["first_audio_at"] is not None]  # fmt: skip
        if call_sid:
            by_call.setdefault(call_sid, []).extend(sorted(timed))
    shares, overshoots = [], []
    for result in results:
        for turn in result.turns:
            if turn.stop_at is None or turn.reply_at is None:
                continue
            created, first_audio = next(
                # The caller dates a frame once its send returned; the simulator may have
                # taken it a moment before that.
                (t for t in by_call.get(result.call_sid, []) if t[0] >= turn.stop_at - 0.005),
                (None, None),
            )
            if created is None or first_audio is None or first_audio > turn.reply_at:
                continue
            own_ms = (first_audio - created) * 1000
            shares.append((turn.reply_at - turn.stop_at) * 1000 - own_ms)
            overshoots.append(own_ms - first_audio_ms)
    return Summary.of(shares), Summary.of(overshoots)
