"""The GPT-Live dialect without sockets: Live's events in, the call core's events out."""

from __future__ import annotations

import base64

from gateway.live_dialect import REPLY_GAP_S, LiveDialect

VOICED = base64.b64encode(bytes(range(0, 160))).decode()
SILENT = base64.b64encode(b"\xff" * 160).decode()


def audio(delta: str = VOICED) -> dict:
    return {"type": "session.output_audio.delta", "delta": delta}


def heard(text: str, start_ms: int, end_ms: int) -> dict:
    return {"type": "session.input_transcript.delta", "event_id": "e", "delta": text,
            "start_ms": start_ms, "end_ms": end_ms}  # fmt: skip


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def test_a_reply_is_framed_from_its_first_voiced_audio_to_the_gap_after_it():
    dialect = LiveDialect()
    assert dialect.inbound(audio(SILENT), 0.0, 0) == []  # Live's silence between replies
    events = dialect.inbound(audio(), 1.0, 500)
    assert types(events) == ["response.created", "response.output_audio.delta"]
    rid = events[0]["response"]["id"]
    assert events[1]["response_id"] == rid and events[1]["delta"] == VOICED
    said = dialect.inbound({"type": "session.output_transcript.delta", "delta": "Olá"}, 1.1, 510)
    assert types(said) == ["response.output_audio_transcript.delta"]
    assert dialect.tick(1.0 + REPLY_GAP_S / 2) == []
    done = dialect.tick(1.0 + REPLY_GAP_S)
    assert types(done) == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.done",
    ]
    assert done[1]["transcript"] == "Olá" and done[2]["response"]["status"] == "completed"


def test_the_callers_words_become_their_turn_and_its_end_times_the_reply():
    dialect = LiveDialect()
    started = dialect.inbound(heard("Quero ", 1000, 1300), 0.0, 1300)
    assert types(started) == ["input_audio_buffer.speech_started"]
    dialect.inbound(heard("anunciar", 1300, 1900), 0.1, 1900)
    events = dialect.inbound(audio(), 0.5, 2500)
    assert types(events) == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_audio.delta",
    ]
    assert events[0]["audio_end_ms"] == 1900
    # Words of that turn that come after the reply began are kept for it.
    assert dialect.inbound(heard(" fazenda", 1900, 2100), 0.6, 2600) == []
    done = dialect.tick(0.5 + REPLY_GAP_S)
    assert done[0]["type"] == "conversation.item.input_audio_transcription.completed"
    assert done[0]["transcript"] == "Quero anunciar fazenda"
    assert done[0]["item_id"] == events[1]["item_id"]


def test_words_that_start_after_the_reply_began_are_a_barge_in():
    dialect = LiveDialect()
    dialect.inbound(audio(), 0.0, 1000)
    events = dialect.inbound(heard("Espera", 1400, 1700), 0.5, 1700)
    assert types(events) == [
        "input_audio_buffer.speech_started",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.done",
    ]
    assert events[-1]["response"]["status"] == "cancelled"


def test_the_cores_realtime_events_become_lives_or_nothing():
    dialect = LiveDialect()
    news = {"type": "conversation.item.create", "item": {"type": "message", "role": "system",
            "content": [{"type": "input_text", "text": "Novidade do WhatsApp"}]}}  # fmt: skip
    assert dialect.outbound(news) == [
        {
            "type": "session.thinking.append",
            "content": "Novidade do WhatsApp",
            "delegation_id": None,
        }
    ]
    for dropped in ("conversation.item.truncate", "conversation.item.delete", "response.cancel",
                    "input_audio_buffer.commit", "response.create", "session.update"):  # fmt: skip
        assert dialect.outbound({"type": dropped}) == []
    greeting = {
        "type": "session.instructions.append",
        "content": "Cumprimente",
        "delegation_id": None,
    }
    assert dialect.outbound(greeting) == [greeting]


def test_usage_is_the_largest_cumulative_figure_never_a_sum():
    dialect = LiveDialect()
    for seconds in (3, 7, 7):
        dialect.inbound({"type": "session.usage.updated", "usage": {"seconds": seconds}}, 0.0, 0)
    assert dialect.usage_seconds == 7
