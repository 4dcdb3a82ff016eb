"""Endrigo's cloned voice through ElevenLabs (VOICE_PROVIDER=elevenlabs), with the official SDK.

The Realtime model answers in text; this speaks the text. A voice note asks for PCM16 at
24 kHz, the rate the OGG/Opus note encoder takes, so no resampling pass sits between them.
Any failure (refused, unreachable, cut mid-stream) is one `VoiceUnavailable`: the caller
falls back to the Realtime voice for that reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from gateway.settings import Settings

if TYPE_CHECKING:
    from elevenlabs.client import AsyncElevenLabs

    from gateway.elevenlabs_stream import ElevenLabsStream

log = logging.getLogger(__name__)

NOTE_FORMAT = "pcm_24000"  # the note encoder's rate
LANGUAGE = "pt"  # the persona speaks Brazilian Portuguese
REQUEST_TIMEOUT_S = 30.0


class VoiceUnavailable(Exception):
    """ElevenLabs could not speak this text (its status or the network's error says why)."""


@dataclass
class Spoken:
    characters: int  # what ElevenLabs bills
    pcm_bytes: int


class ElevenLabsVoice:
    def __init__(
        self,
        client: AsyncElevenLabs,
        http: httpx.AsyncClient,
        voice_id: str,
        model_id: str,
        *,
        base_url: str = "",
        api_key: str = "",
    ) -> None:
        self.client = client
        self._http = http  # ours, handed to the SDK: closed with this voice
        self.voice_id = voice_id
        self.model_id = model_id
        self.base_url = base_url
        self._api_key = api_key  # for the calls' websocket, which the SDK's helper cannot do

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str, api_key: str) -> ElevenLabsVoice:
        from elevenlabs.client import AsyncElevenLabs

        http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
        client = AsyncElevenLabs(api_key=api_key, base_url=base_url, httpx_client=http)
        assert settings.elevenlabs_voice_id is not None, "checked by Settings"
        return cls(
            client,
            http,
            settings.elevenlabs_voice_id,
            settings.elevenlabs_model,
            base_url=base_url,
            api_key=api_key,
        )

    async def open_stream(self) -> ElevenLabsStream:
        """A call reply's stream-input socket (gateway/elevenlabs_stream.py)."""
        from gateway.elevenlabs_stream import ElevenLabsStream

        return await ElevenLabsStream.open(
            self.base_url, self._api_key, self.voice_id, self.model_id
        )

    async def speak_pcm24k(self, text: str, on_pcm: Callable[[bytes], None]) -> Spoken:
        """Stream `text` as PCM16 24 kHz mono into `on_pcm`, whole samples only."""
        from elevenlabs.core.api_error import ApiError

        carry, total = b"", 0
        try:
            chunks = self.client.text_to_speech.stream(
                self.voice_id,
                text=text,
                model_id=self.model_id,
                output_format=NOTE_FORMAT,
                language_code=LANGUAGE,
                request_options={"max_retries": 0},
            )
            async for chunk in chunks:
                data = carry + chunk
                whole = len(data) - len(data) % 2
                carry = data[whole:]
                if whole:
                    on_pcm(data[:whole])
                    total += whole
        except ApiError as err:
            raise VoiceUnavailable(f"ElevenLabs answered {err.status_code}") from err
        except httpx.HTTPError as err:
            raise VoiceUnavailable(f"ElevenLabs unreachable: {type(err).__name__}") from err
        if total == 0:
            raise VoiceUnavailable("ElevenLabs sent no audio")
        return Spoken(characters=len(text), pcm_bytes=total)

    async def close(self) -> None:
        await self._http.aclose()
