"""The voice the calls are answered in: the ElevenLabs simulator's process, the gateway's
settings for it, and how the report names it."""

from __future__ import annotations

import sys

# The simulator accepts any key when started without --api-key; this voice id is one it knows.
API_KEY = "sk-loadtest-not-a-secret"
VOICE_ID = "EndrigoSimVoice00001"
MODEL = "eleven_flash_v2_5"  # the gateway's default ELEVENLABS_MODEL
VOICES = ("openai", "elevenlabs")  # what --voice both runs, in this order

NAMES = {
    "openai": "openai (the Realtime voice)",
    "elevenlabs": "elevenlabs (Realtime text -> ElevenLabs simulator, its default latencies)",
}


def voice_name(voice: str) -> str:
    return NAMES.get(voice, voice)


def simulator_argv(port: int) -> list[str]:
    """`python -m simulators.elevenlabs` with its own default latency, speed and rate."""
    return [sys.executable, "-m", "simulators.elevenlabs", "--port", str(port),
            "--log-level", "WARNING"]  # fmt: skip


def gateway_env(voice: str, elevenlabs_port: int | None) -> dict[str, str]:
    """The gateway's voice settings: none for the Realtime voice."""
    if voice != "elevenlabs" or elevenlabs_port is None:
        return {}
    return {
        "VOICE_PROVIDER": "elevenlabs",
        "ELEVENLABS_API_KEY": API_KEY,
        "ELEVENLABS_VOICE_ID": VOICE_ID,
        "ELEVENLABS_MODEL": MODEL,
        "ELEVENLABS_BASE_URL": f"http://127.0.0.1:{elevenlabs_port}",
    }
