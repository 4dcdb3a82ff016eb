"""The call core driven by plain events and an explicit clock: no sockets, no sleeps."""

import base64

import orjson

from gateway.call_state import (
    CallState,
    CloseUpstream,
    EndCall,
    Phase,
    RecordTurn,
    RecordUsage,
    SendRealtime,
    SendRealtimeRaw,
    SendTwilio,
    UpstreamError,
)
from simulators.speech import speech_mulaw

SID = "MZ" + "0" * 32


def start(state: CallState, now: float = 0.0):
    state.upstream_opened(now)
    return state.on_twilio(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": SID,
            "start": {"streamSid": SID, "callSid": "CA1", "customParameters": {}},
        },
        now,
    )


def media(payload: bytes) -> dict:
    return {
        "event": "media",
        "streamSid": SID,
        "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()},
    }


def delta(audio: bytes, item="item_1", response="resp_1") -> dict:
    return {
        "type": "response.output_audio.delta",
        "response_id": response,
        "item_id": item,
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(audio).decode(),
    }


def twilio_messages(actions):
    return [a.message for a in actions if isinstance(a, SendTwilio)]


def realtime_events(actions):
    return [a.event for a in actions if isinstance(a, SendRealtime)]


def session_updated(fmt="audio/pcmu", interrupt=True) -> dict:
    return {
        "type": "session.updated",
        "session": {
            "audio": {
                "input": {
                    "format": {"type": fmt},
                    "turn_detection": {"type": "server_vad", "interrupt_response": interrupt},
                },
                "output": {"format": {"type": fmt}},
            }
        },
    }


def test_inbound_media_passes_through_untouched():
    state = CallState()
    start(state)
    frame = speech_mulaw(20)
    msg = media(frame)
    [action] = state.on_twilio(msg, 0.02)
    assert isinstance(action, SendRealtimeRaw)
    event = orjson.loads(action.data)
    assert event == {"type": "input_audio_buffer.append", "audio": msg["media"]["payload"]}


def test_outbound_deltas_go_as_whole_160_byte_frames_each_chunk_with_a_mark():
    state = CallState()
    start(state)
    audio = speech_mulaw(500)  # 4000 bytes, delivered in ragged deltas
    sent = []
    for chunk in (audio[:1000], audio[1000:1333], audio[1333:3999], audio[3999:]):
        sent += twilio_messages(state.on_realtime(delta(chunk), 0.1))
    sent += twilio_messages(
        state.on_realtime(
            {"type": "response.output_audio.done", "response_id": "resp_1", "item_id": "item_1"},
            0.2,
        )
    )
    medias = [m for m in sent if m["event"] == "media"]
    marks = [m for m in sent if m["event"] == "mark"]
    assert [m["event"] for m in sent] == ["media", "mark"] * len(medias)
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in medias]
    assert all(size % 160 == 0 and size > 0 for size in sizes)
    payload = b"".join(base64.b64decode(m["media"]["payload"]) for m in medias)
    assert payload[: len(audio)] == audio  # bit-exact, remainder carried across deltas
    assert len(payload) == 4000  # 4000 is 25 whole frames: the tail needed no padding
    assert sizes == [960, 320, 2560, 160]  # each remainder rode on to the next delta
    assert all(set(m) == {"event", "streamSid", "media"} for m in medias)
    assert all(set(m["media"]) == {"payload"} for m in medias)
    assert len({m["mark"]["name"] for m in marks}) == len(marks)


def test_audio_before_start_waits_for_the_stream_then_goes_at_once():
    state = CallState()
    assert state.on_realtime(delta(speech_mulaw(100)), 1.0) == []
    actions = start(state, now=1.5)
    medias = [m for m in twilio_messages(actions) if m["event"] == "media"]
    assert sum(len(base64.b64decode(m["media"]["payload"])) for m in medias) == 800
    assert state.greeting_ms == 0.0 and state.frames_sent == 5


def test_barge_in_clears_the_phone_and_truncates_to_what_was_heard():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    state.on_realtime({"type": "response.created", "response": {"id": "resp_1"}}, 0.1)
    sent = []
    for i in range(8):  # eight 120 ms deltas reach the idle phone at t=0.2
        sent += twilio_messages(state.on_realtime(delta(speech_mulaw(120, seed=i)), 0.2))
    marks = [m["mark"]["name"] for m in sent if m["event"] == "mark"]
    # Twilio echoes each mark as its chunk finishes playing: 0.32, 0.44, 0.56 ...
    for n, name in enumerate(marks[:3], start=1):
        state.on_twilio({"event": "mark", "streamSid": SID, "mark": {"name": name}}, 0.2 + n * 0.12)
    # The caller talks over it at 0.66 s: 460 ms of the reply have played.
    actions = state.on_realtime({"type": "input_audio_buffer.speech_started"}, 0.66)
    assert {"event": "clear", "streamSid": SID} in twilio_messages(actions)
    [truncate] = realtime_events(actions)  # server VAD cancels the response itself
    assert truncate == {
        "type": "conversation.item.truncate",
        "item_id": "item_1",
        "content_index": 0,
        "audio_end_ms": 460,
    }
    # Late deltas of the interrupted response are not played; cleared marks are ignored.
    assert state.on_realtime(delta(speech_mulaw(200)), 0.75) == []
    state.on_twilio({"event": "mark", "streamSid": SID, "mark": {"name": marks[-1]}}, 0.76)
    assert not state.playback_pending


def test_barge_in_with_nothing_heard_deletes_the_item_and_cancels_when_server_will_not():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(interrupt=False), 0.0)
    state.on_realtime({"type": "response.created", "response": {"id": "resp_1"}}, 0.1)
    state.on_realtime(delta(speech_mulaw(300)), 0.2)
    actions = state.on_realtime({"type": "input_audio_buffer.speech_started"}, 0.2)
    events = realtime_events(actions)
    assert {"type": "response.cancel"} in events
    assert {"type": "conversation.item.delete", "item_id": "item_1"} in events
    assert not any(e["type"] == "conversation.item.truncate" for e in events)


def test_speech_while_nothing_plays_touches_nothing():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    assert state.on_realtime({"type": "input_audio_buffer.speech_started"}, 1.0) == []


def test_truncate_never_exceeds_the_audio_received():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    state.on_realtime({"type": "response.created", "response": {"id": "r"}}, 0.0)
    sent = twilio_messages(state.on_realtime(delta(speech_mulaw(100), response="r"), 0.0))
    sent += twilio_messages(
        state.on_realtime(
            {"type": "response.output_audio.done", "response_id": "r", "item_id": "item_1"}, 0.0
        )
    )
    last = [m for m in sent if m["event"] == "mark"][-1]["mark"]["name"]
    state.on_realtime(delta(speech_mulaw(50), item="item_2", response="r"), 0.0)
    state.on_twilio({"event": "mark", "streamSid": SID, "mark": {"name": last}}, 0.2)
    actions = state.on_realtime({"type": "input_audio_buffer.speech_started"}, 0.2)
    [event] = realtime_events(actions)
    assert event["type"] == "conversation.item.delete" and event["item_id"] == "item_2"


def test_wrong_upstream_format_ends_the_call():
    state = CallState()
    start(state)
    end, close = state.on_realtime(session_updated(fmt="audio/pcm"), 0.0)
    assert isinstance(end, EndCall) and isinstance(close, CloseUpstream)
    assert state.phase is Phase.ENDED


def test_turn_latency_runs_from_end_of_speech_to_first_frame():
    state = CallState()
    start(state, now=0.0)
    state.on_realtime(session_updated(), 0.0)
    t = 0.0
    for _ in range(50):  # one second of caller audio, a frame every 20 ms
        t += 0.02
        state.on_twilio(media(speech_mulaw(20)), t)
    # The server says speech ended at 600 ms of audio, after its 500 ms silence window.
    state.on_realtime({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 600}, 1.1)
    state.on_realtime({"type": "response.created", "response": {"id": "r"}}, 1.15)
    state.on_realtime(delta(speech_mulaw(200), response="r"), 1.4)
    [turn] = state.turns
    assert round(turn.end_of_speech, 2) == 0.6
    assert round(turn.response_latency_ms) == 800
    assert round(turn.upstream_first_audio_ms) == 300
    assert turn.gateway_ms == 0.0


def test_end_of_speech_excludes_the_vad_silence_window():
    state = CallState()
    start(state, now=0.0)
    updated = session_updated()
    updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] = 500
    state.on_realtime(updated, 0.0)
    t = 0.0
    for _ in range(60):
        t += 0.02
        state.on_twilio(media(speech_mulaw(20)), t)
    # Speech ended at 600 ms of audio; the server reports 1100 (600 + its 500 ms of silence).
    state.on_realtime({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1100}, 1.15)
    assert round(state.turns[-1].end_of_speech, 2) == 0.6


def test_assistant_turn_is_recorded_once_played_with_its_latency():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    state.on_realtime({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 0}, 0.5)
    sent = twilio_messages(state.on_realtime(delta(speech_mulaw(100), response="r"), 0.9))
    done = {"response_id": "r", "item_id": "item_1"}
    assert state.on_realtime({"type": "response.output_audio.done", **done}, 0.9) == []
    assert (
        state.on_realtime(
            {"type": "response.output_audio_transcript.done", "transcript": "Olá!", **done}, 0.9
        )
        == []
    )
    last = [m for m in sent if m["event"] == "mark"][-1]["mark"]["name"]
    [turn] = state.on_twilio({"event": "mark", "streamSid": SID, "mark": {"name": last}}, 1.0)
    assert isinstance(turn, RecordTurn) and turn.text == "Olá!" and turn.audio_ms == 100
    assert turn.response_latency_ms is not None
    assert state.transcript == [("assistant", "Olá!")]


def test_interrupted_reply_is_remembered_as_cut():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    state.on_realtime({"type": "response.created", "response": {"id": "r"}}, 0.0)
    state.on_realtime(delta(speech_mulaw(1000), response="r"), 0.0)
    state.on_realtime(
        {
            "type": "response.output_audio_transcript.done",
            "response_id": "r",
            "item_id": "item_1",
            "transcript": "um dois três quatro cinco seis sete oito nove dez",
        },
        0.0,
    )
    actions = state.on_realtime({"type": "input_audio_buffer.speech_started"}, 0.5)
    [turn] = [a for a in actions if isinstance(a, RecordTurn)]
    assert turn.text.endswith("…") and turn.text.startswith("um dois")
    assert "dez" not in turn.text and turn.audio_ms == 500


def test_dtmf_stop_usage_and_errors():
    state = CallState()
    start(state)
    [dtmf] = state.on_twilio({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "7"}}, 0)
    assert dtmf == RecordTurn("dtmf", "7")
    usage = {"total_tokens": 10}
    [u] = state.on_realtime({"type": "response.done", "response": {"id": "r", "usage": usage}}, 0)
    assert u == RecordUsage("r", usage, 0)
    benign = {"type": "error", "error": {"code": "response_cancel_not_active", "message": "x"}}
    assert state.on_realtime(benign, 0) == []
    [err] = state.on_realtime({"type": "error", "error": {"code": "boom", "message": "m"}}, 0)
    assert isinstance(err, UpstreamError)
    end, close = state.on_twilio({"event": "stop", "streamSid": SID, "stop": {}}, 0)
    assert isinstance(end, EndCall) and isinstance(close, CloseUpstream) and state.ended


def test_hang_up_remembers_the_reply_as_far_as_it_was_heard():
    state = CallState()
    start(state)
    state.on_realtime(session_updated(), 0.0)
    state.on_realtime(delta(speech_mulaw(1000), response="r"), 0.0)
    done = {"response_id": "r", "item_id": "item_1"}
    state.on_realtime({"type": "response.output_audio.done", **done}, 0.0)
    state.on_realtime(
        {
            "type": "response.output_audio_transcript.done",
            "transcript": "um dois três quatro",
            **done,
        },
        0.0,
    )
    actions = state.on_twilio({"event": "stop", "streamSid": SID, "stop": {}}, 0.5)
    [turn] = [a for a in actions if isinstance(a, RecordTurn)]
    assert turn.text == "um dois…" and turn.audio_ms == 500
    assert [type(a) for a in actions[-2:]] == [EndCall, CloseUpstream]
