"""What a running gateway holds: settings, the store and the outside-world clients.

One object under one AppKey, so handlers in every module reach the same resources.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.limits import Limits
from gateway.memory import MemoryHolders
from gateway.settings import Settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from gateway.crm import CrmOutbox
    from gateway.elevenlabs import ElevenLabsVoice
    from gateway.persona import Persona
    from gateway.store import Store
    from gateway.summaries import Summarizer
    from gateway.twilio_api import TwilioSignatures
    from gateway.usage import Prices

# Fixed so the sandbox's printed commands keep working across restarts; not secrets.
SANDBOX_ACCOUNT_SID = "AC" + "5a" * 16
SANDBOX_AUTH_TOKEN = "sandbox-auth-token-not-a-secret"
SANDBOX_OPENAI_KEY = "sk-sandbox-not-a-secret"
SANDBOX_ELEVENLABS_KEY = "sk_sandbox_elevenlabs_not_a_secret"


@dataclass
class Runtime:
    settings: Settings
    started: float = field(default_factory=time.monotonic)
    persona: Persona | None = None
    store: Store | None = None
    prices: dict[str, Prices] = field(default_factory=dict)
    summarizer: Summarizer | None = None
    crm: CrmOutbox | None = None  # sends leads to CRM_WEBHOOK_URL; None without one
    holders: MemoryHolders = field(default_factory=MemoryHolders)  # told at erasure
    openai: AsyncOpenAI | None = None
    twilio: Any = None  # twilio.rest.Client with the async HTTP client
    realtime_sim: Any = None  # simulators.realtime.RealtimeSimulator in the sandbox
    twilio_sim: Any = None  # simulators.twilio.TwilioSimulator in the sandbox
    elevenlabs: ElevenLabsVoice | None = None  # VOICE_PROVIDER=elevenlabs: who speaks replies
    elevenlabs_sim: Any = None  # simulators.elevenlabs.ElevenLabsSimulator in the sandbox
    _signatures: TwilioSignatures | None = field(default=None, repr=False)
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = Limits.from_settings(self.settings)

    @property
    def voice(self) -> str:
        """REALTIME_VOICE if set, else the persona's own voice."""
        if self.settings.realtime_voice:
            return self.settings.realtime_voice
        assert self.persona is not None, "the app loads its persona at start"
        return self.persona.voice

    @property
    def realtime_backend(self) -> str:
        return "simulator" if self.realtime_sim is not None else "openai"

    @property
    def openai_base_url(self) -> str:
        if self.realtime_sim is not None:
            return self.realtime_sim.base_url
        return self.settings.openai_base_url

    @property
    def twilio_backend(self) -> str:
        return "simulator" if self.twilio_sim is not None else "twilio"

    @property
    def twilio_account_sid(self) -> str:
        return self.settings.twilio_account_sid or SANDBOX_ACCOUNT_SID

    @property
    def twilio_auth_token(self) -> str:
        return self.settings.twilio_auth_token or SANDBOX_AUTH_TOKEN

    @property
    def twilio_api_base_url(self) -> str:
        if self.twilio_sim is not None:
            return self.twilio_sim.base_url
        return self.settings.twilio_api_base_url

    @property
    def signatures(self) -> TwilioSignatures:
        """Checks made with the effective auth token against PUBLIC_BASE_URL."""
        if self._signatures is None:
            from gateway.twilio_api import TwilioSignatures

            self._signatures = TwilioSignatures(
                self.twilio_auth_token,
                self.settings.public_base_url,
                self.settings.public_stream_base_url,
            )
        return self._signatures

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started


RUNTIME = web.AppKey("runtime", Runtime)
