"""The GPT-Live dialect without sockets: Live's events in, the call core's events out."""

from __future__ import annotations

import base64

from gateway.live_dialect import HELD_ANSWER_S, REPLY_GAP_S, LiveDialect

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
                    "input_audio_buffer.commit", "session.update"):  # fmt: skip
        assert dialect.outbound({"type": dropped}) == []
    greeting = {
        "type": "session.instructions.append",
        "content": "Cumprimente",
        "delegation_id": None,
    }
    assert dialect.outbound(greeting) == [greeting]


def backend(event: dict) -> dict:
    return {"type": "response.event", "event": event, "delegation_id": "dlg_1"}


def test_a_delegated_function_call_runs_through_the_cores_tool_flow():
    dialect = LiveDialect()
    created = dialect.inbound(
        backend({"type": "response.created", "response": {"id": "r1"}}), 0.0, 0
    )
    assert created == [{"type": "gateway.delegated_response.created", "response_id": "r1"}]
    item = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "end_call",
            "arguments": "{}"}  # fmt: skip
    [call] = dialect.inbound(backend({"type": "response.output_item.done", "item": item}), 0.1, 0)
    assert (call["type"], call["response_id"], call["call_id"], call["name"]) == (
        "response.function_call_arguments.done", "r1", "c1", "end_call")  # fmt: skip
    completed = {"type": "response.completed", "response": {"id": "r1", "status": "completed"}}
    assert types(dialect.inbound(backend(completed), 0.2, 0)) == ["response.done"]
    # The core's answer goes back to the backend, and the delegation continues.
    answer = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    output = {"type": "conversation.item.create", "item": answer}
    assert dialect.outbound(output) == [{"type": "response.item.create", "item": output["item"]}]
    assert dialect.outbound({"type": "response.create", "response": {}}) == [
        {"type": "response.create"}
    ]


def test_a_backend_answer_is_done_only_once_the_voice_has_spoken_it():
    dialect = LiveDialect()
    dialect.inbound(backend({"type": "response.created", "response": {"id": "r2"}}), 0.0, 0)
    completed = {"type": "response.completed", "response": {"id": "r2", "status": "completed"}}
    assert dialect.inbound(backend(completed), 0.1, 0) == []  # held: not spoken yet
    dialect.inbound(audio(), 0.2, 100)
    done = dialect.tick(0.2 + REPLY_GAP_S)
    assert [e["response"]["id"] for e in done if e["type"] == "response.done"][-1] == "r2"


def test_a_backend_answer_never_spoken_is_released_in_time():
    dialect = LiveDialect()
    dialect.inbound(backend({"type": "response.created", "response": {"id": "r3"}}), 0.0, 0)
    completed = {"type": "response.completed", "response": {"id": "r3", "status": "completed"}}
    dialect.inbound(backend(completed), 0.0, 0)
    assert dialect.tick(HELD_ANSWER_S - 0.1) == []
    assert types(dialect.tick(HELD_ANSWER_S)) == ["response.done"]
