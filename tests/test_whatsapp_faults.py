"""WhatsApp under a misbehaving OpenAI, over real sockets: a malformed event in a reply is
skipped and the person still gets the reply's text and voice note."""

from __future__ import annotations

import pytest

from simulators.realtime import RealtimeSimConfig
from tests.test_call_faults import first_of, with_field
from tests.test_whatsapp import REPLY, harness_for

BROKEN = {
    "delta not base64": ("response.output_audio.delta", with_field("delta", "%%nope%%")),
    "delta a number": ("response.output_audio.delta", with_field("delta", 5)),
    "response a list": ("response.created", with_field("response", [])),
    "usage a string": ("response.done", with_field("response.usage", "many")),
    "an event that is a list": ("response.output_audio_transcript.delta", lambda e: [e]),
    "not json": ("response.output_audio_transcript.delta", lambda e: "{oops"),
}


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=30, speed=20.0, reply_text=REPLY)


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_a_malformed_event_in_a_reply_still_gets_the_person_an_answer(
    case, gateway, twilio_sim, realtime_sim, sim_config
):
    event_type, breaker = BROKEN[case]
    sim_config.mangle = first_of(event_type, breaker)
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        result = await wa.sender.send_text("Olá, tudo bem?")
        text, voice = await wa.replies(2)
        assert await wa.settled(result.message_sid) == "done"
    assert text.body == REPLY and len(voice.media_urls) == 1
