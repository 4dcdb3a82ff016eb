"""Who answers the calls: the OpenAI API (--backend: Realtime or GPT-Live) and the voice
(--voice: the model's or ElevenLabs'), the gateway's settings for each, the ElevenLabs
simulator's process, and how the report names them."""

from __future__ import annotations

import sys

# The simulator accepts any key when started without --api-key; this voice id is one it knows.
API_KEY = "sk-loadtest-not-a-secret"
VOICE_ID = "EndrigoSimVoice00001"
MODEL = "eleven_flash_v2_5"  # the gateway's default ELEVENLABS_MODEL
VOICES = ("openai", "elevenlabs")  # what --voice both runs, in this order
BACKENDS = ("realtime", "live")  # what --backend both runs, in this order

NAMES = {
    "openai": "openai (the Realtime voice)",
    "elevenlabs": "elevenlabs (Realtime text -> ElevenLabs simulator, its default latencies)",
}
LIVE_VOICE = "openai (GPT-Live's own voice)"
BACKEND_NAMES = {
    "realtime": "realtime (OpenAI Realtime API, billed per token)",
    "live": "live (GPT-Live, billed per session minute; the simulator on the same base URL)",
}


def voice_name(voice: str, backend: str = "realtime") -> str:
    if backend == "live" and voice == "openai":
        return LIVE_VOICE
    return NAMES.get(voice, voice)


def backend_name(backend: str) -> str:
    return BACKEND_NAMES.get(backend, backend)


def backend_env(backend: str) -> dict[str, str]:
    """The gateway's VOICE_BACKEND, always explicit: the run's --backend decides."""
    return {"VOICE_BACKEND": backend}


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
