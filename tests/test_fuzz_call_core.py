"""Property tests of the call core with hypothesis: arbitrary Twilio messages and Realtime
events, built from the real shapes with wrong types, missing and extra keys, interleaved with
ticks, drops and reconnects on a moving clock.

Properties: the core never raises; every `media` it sends the phone holds whole 160-byte frames;
every truncate stays within the audio the model sent for that item; every event it sends OpenAI
validates against the SDK's types; after the end nothing is appended.

FUZZ_EXAMPLES raises the example count for a long run (CI runs the default).
"""

from __future__ import annotations

import base64
import copy
import os
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.call_state import CallState, Phase, SendRealtime, SendRealtimeRaw, SendTwilio
from simulators.realtime_events import check_client_event

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SID = "MZ" + "0" * 32
START = {"event": "start", "streamSid": SID, "start": {"streamSid": SID, "callSid": "CA1"}}
SESSION_UPDATED = {"type": "session.updated", "session": {"audio": {
    "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"interrupt_response": True}},
    "output": {"format": {"type": "audio/pcmu"}}}}}  # fmt: skip

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip
audio = st.binary(min_size=100, max_size=1200).map(lambda b: base64.b64encode(b).decode())
ids = st.sampled_from(["item_1", "item_2", "item_3"])
responses = st.sampled_from(["resp_1", "resp_2", "resp_3"])


def twilio_shapes() -> st.SearchStrategy[dict[str, Any]]:
    frame = st.binary(min_size=160, max_size=160).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(
        st.builds(lambda p: {"event": "media", "streamSid": SID,
                             "media": {"track": "inbound", "payload": p}}, frame),
        st.builds(lambda n: {"event": "mark", "streamSid": SID, "mark": {"name": str(n)}},
                  st.integers(0, 40)),
        st.builds(lambda d: {"event": "dtmf", "streamSid": SID, "dtmf": {"digit": d}},
                  st.sampled_from(list("0123456789*#"))),
        st.just({"event": "start", "streamSid": SID,
                 "start": {"streamSid": SID, "callSid": "CA1", "customParameters": {}}}),
        st.just({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
    )  # fmt: skip


def realtime_shapes() -> st.SearchStrategy[dict[str, Any]]:
    fmt = st.sampled_from(["audio/pcmu"] * 9 + ["audio/pcm"])
    return _weighted(
        st.builds(lambda f, i: {"type": "session.updated", "session": {"audio": {
            "input": {"format": {"type": f}, "turn_detection": {
                "type": "server_vad", "interrupt_response": i, "silence_duration_ms": 500}},
            "output": {"format": {"type": f}}}}}, fmt, st.booleans()),
        st.builds(lambda r: {"type": "response.created", "response": {"id": r}}, responses),
        st.builds(lambda r, u: {"type": "response.done", "response": {"id": r, "usage": u}},
                  responses, st.one_of(st.none(), st.just({"total_tokens": 5}))),
        st.builds(lambda r, i, d: {"type": "response.output_audio.delta", "response_id": r,
                                   "item_id": i, "delta": d}, responses, ids, audio),
        st.builds(lambda r, i: {"type": "response.output_audio.done", "response_id": r,
                                "item_id": i}, responses, ids),
        st.builds(lambda r, i, t: {"type": "response.output_audio_transcript.delta",
                                   "response_id": r, "item_id": i, "delta": t},
                  responses, ids, st.text(max_size=8)),
        st.builds(lambda r, i, t: {"type": "response.output_audio_transcript.done",
                                   "response_id": r, "item_id": i, "transcript": t},
                  responses, ids, st.text(max_size=20)),
        st.builds(lambda i: {"type": "input_audio_buffer.committed", "item_id": i}, ids),
        st.builds(lambda i, t: {"type": "conversation.item.input_audio_transcription.completed",
                                "item_id": i, "transcript": t}, ids, st.text(max_size=20)),
        st.builds(lambda i: {"type": "conversation.item.input_audio_transcription.failed",
                             "item_id": i}, ids),
        st.just({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0}),
        st.builds(lambda ms: {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms},
                  st.integers(0, 10_000)),
        st.builds(lambda c: {"type": "error", "error": {"code": c, "message": "m"}},
                  st.sampled_from(["boom", "response_cancel_not_active", None])),
        heavy={3: 8, 1: 2, 10: 2, 4: 2},  # deltas most, then responses, barge-ins, audio done
    )  # fmt: skip


def _weighted(*branches: st.SearchStrategy[Any], heavy: dict[int, int]) -> st.SearchStrategy[Any]:
    """Like one_of, but branch i drawn heavy[i] times as often (one_of favours the first)."""
    pool = [b for i, b in enumerate(branches) for _ in range(heavy.get(i, 1))]
    return st.sampled_from(pool).flatmap(lambda branch: branch)


def mutated(shapes: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """The real shape, then maybe a value swapped for junk, a key dropped or one added."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = copy.deepcopy(draw(shapes))  # st.just shares its value between examples
        for _ in range(draw(st.integers(0, 2))):
            node = message
            while isinstance(node, dict) and node and draw(st.booleans()):
                child = node[draw(st.sampled_from(sorted(node, key=str)))]
                if not isinstance(child, dict) or not child:
                    break
                node = child
            if not isinstance(node, dict) or not node:
                break
            key = draw(st.sampled_from(sorted(node, key=str)))
            action = draw(st.sampled_from(["junk", "drop", "extra"]))
            if action == "junk":
                node[key] = draw(junk)
            elif action == "drop":
                del node[key]
            else:
                node[draw(st.text(max_size=6))] = draw(junk)
        return message

    return st.one_of(shapes, shapes, build(), junk)  # mostly real, so calls get somewhere


twilio_step = st.tuples(st.just("twilio"), mutated(twilio_shapes()))
realtime_step = st.tuples(st.just("realtime"), mutated(realtime_shapes()))
lifecycle = st.tuples(st.sampled_from(["lost", "opened", "end", "stop"]), st.none())
# Mostly messages, so a call lives long enough to play, be interrupted and reconnect.
STEP_KINDS = {"twilio": twilio_step, "realtime": realtime_step,
              "tick": st.tuples(st.just("tick"), st.none()), "life": lifecycle}  # fmt: skip
steps = st.lists(
    st.sampled_from(["twilio"] * 8 + ["realtime"] * 10 + ["tick", "life"]).flatmap(STEP_KINDS.get),
    min_size=10,
    max_size=120,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=steps, dt=st.floats(0.0, 0.3))
# Found by a longer fuzz run: names isdigit() accepts and int() refuses.
@example(steps=[("twilio", {"event": "mark", "mark": {"name": "²"}})], dt=0.1)
@example(steps=[("twilio", {"event": "mark", "mark": {"name": "1" * 4301}})], dt=0.1)
def test_the_call_core_survives_anything_and_keeps_its_promises(steps, dt) -> None:
    state = CallState()
    state.upstream_opened(0.0, {"type": "response.create", "response": {}})
    state.on_realtime(SESSION_UPDATED, 0.0)
    state.on_twilio(START, 0.0)
    received: dict[str, int] = {}  # audio bytes the model sent per item, as the core saw them
    now = 0.0
    for kind, message in steps:
        now += dt
        if kind == "realtime" and _valid_delta(message):
            item = message["item_id"]
            received[item] = received.get(item, 0) + len(base64.b64decode(message["delta"]))
        ended_before = state.phase in (Phase.ENDING, Phase.ENDED)
        actions = _step(state, kind, message, now)
        for action in actions:
            _check(action, received)
            if ended_before:
                assert not isinstance(action, SendRealtimeRaw)


def _step(state: CallState, kind: str, message: Any, now: float) -> list[Any]:
    if kind == "twilio":
        return state.on_twilio(message, now)
    if kind == "realtime":
        return state.on_realtime(message, now)
    if kind == "tick":
        return state.tick(now)
    if kind == "lost":
        return state.upstream_lost(now, "fuzz")
    if kind == "opened":
        return state.upstream_opened(now)
    if kind == "stop":
        return state.on_twilio({"event": "stop", "streamSid": SID, "stop": {}}, now)
    return state.end(now, "fuzz")


def _valid_delta(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("type") != "response.output_audio.delta":
        return False
    fields = (message.get("item_id"), message.get("response_id"), message.get("delta"))
    if not all(isinstance(f, str) for f in fields):
        return False
    try:
        base64.b64decode(message["delta"], validate=True)
    except ValueError:
        return False
    return True


def _check(action: Any, received: dict[str, int]) -> None:
    if isinstance(action, SendTwilio) and action.message["event"] == "media":
        size = len(base64.b64decode(action.message["media"]["payload"]))
        assert size > 0 and size % 160 == 0
    if isinstance(action, SendRealtime):
        event = action.event
        check_client_event({**event, "event_id": "gw_1"})
        if event["type"] == "conversation.item.truncate":
            assert isinstance(event["audio_end_ms"], int) and event["audio_end_ms"] > 0
            assert event["audio_end_ms"] <= received.get(event["item_id"], 0) // 8
