"""What the load runs against: the gateway's and the simulators' processes and addresses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .whatsapp_burst import TwilioView


@dataclass
class Stack:
    """What the load runs against."""

    gateway_pid: int | None = None
    twilio: TwilioView | None = None
    db_path: Path | None = None
    simulator_pid: int | None = None  # the Realtime simulator, when spawned
    simulator_url: str | None = None  # its origin, for its own timings (GET /sim/timings)
    voice_pid: int | None = None  # the ElevenLabs simulator, when spawned (--voice elevenlabs)
