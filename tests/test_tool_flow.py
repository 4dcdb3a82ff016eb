"""Function calls on a call, in the core: plain events and an explicit clock, no sockets.

The model's last sentence must play before the call is moved on; the `response.create` that
answers tool outputs goes only once the calling response is over and every output is in."""

from gateway.call_state import ActOnCall, CallState, RunTool, SendRealtime
from gateway.tool_flow import AfterPlayback
from simulators.speech import speech_mulaw
from tests.test_call_state import delta, realtime_events, start, twilio_messages


def function_call(call_id="call_1", name="end_call", response="resp_1", arguments="{}"):
    return {
        "type": "response.function_call_arguments.done",
        "event_id": "event_1",
        "response_id": response,
        "item_id": f"item_{call_id}",
        "output_index": 0,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def created(response: str) -> dict:
    return {"type": "response.created", "response": {"id": response, "status": "in_progress"}}


def done(response: str) -> dict:
    return {"type": "response.done", "response": {"id": response, "status": "completed"}}


def audio_done(response: str, item: str) -> dict:
    return {"type": "response.output_audio.done", "response_id": response, "item_id": item}


def echo(name: str) -> dict:
    return {"event": "mark", "streamSid": "x", "mark": {"name": name}}


def sentence(state: CallState, response: str, item: str, now: float) -> list[str]:
    """The model says a sentence; the names of the marks that follow its audio."""
    actions = state.on_realtime(delta(speech_mulaw(400), item=item, response=response), now)
    actions += state.on_realtime(audio_done(response, item), now)
    return [m["mark"]["name"] for m in twilio_messages(actions) if m["event"] == "mark"]


def test_a_function_call_is_run_and_answered_once_the_response_is_over():
    state = CallState()
    start(state)
    state.on_realtime(created("resp_1"), 0.1)
    [run] = state.on_realtime(function_call(), 0.2)
    assert isinstance(run, RunTool) and run.call.name == "end_call"
    output = state.tool_finished("call_1", "ok", 0.3)
    # The output goes at once; the response.create waits: resp_1 is still active.
    assert realtime_events(output) == [
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
        }
    ]
    answer = state.on_realtime(done("resp_1"), 0.4)
    assert realtime_events(answer) == [{"type": "response.create", "response": {}}]


def test_parallel_calls_get_one_response_create_after_the_last_output():
    state = CallState()
    start(state)
    state.on_realtime(created("resp_1"), 0.1)
    state.on_realtime(function_call("call_a", "save_lead"), 0.2)
    state.on_realtime(function_call("call_b", "send_whatsapp"), 0.2)
    assert realtime_events(state.on_realtime(done("resp_1"), 0.3)) == []
    first = realtime_events(state.tool_finished("call_a", "a", 0.4))
    last = realtime_events(state.tool_finished("call_b", "b", 0.5))
    assert [e["type"] for e in first] == ["conversation.item.create"]
    assert [e["type"] for e in last] == ["conversation.item.create", "response.create"]
    assert state.tool_finished("call_b", "b", 0.6) == []  # a second finish sends nothing


def test_the_hang_up_waits_for_the_goodbye_to_be_played_to_the_last_mark():
    state = CallState()
    start(state)
    state.on_realtime(created("resp_1"), 0.1)
    state.on_realtime(function_call(), 0.2)
    state.on_realtime(done("resp_1"), 0.3)
    hangup = AfterPlayback("hangup")
    assert [e["type"] for e in realtime_events(state.tool_finished("call_1", "ok", 0.4, hangup))]\
        == ["conversation.item.create", "response.create"]  # fmt: skip
    # The answer: the goodbye, streamed, then done while the phone still plays it.
    state.on_realtime(created("resp_2"), 0.5)
    marks = sentence(state, "resp_2", "item_bye", 0.6)
    assert marks and not [
        a for a in state.on_realtime(done("resp_2"), 0.7) if isinstance(a, ActOnCall)
    ]
    acted = []
    for name in marks:
        acted.append([a for a in state.on_twilio(echo(name), 1.0) if isinstance(a, ActOnCall)])
    assert acted[:-1] == [[]] * (len(marks) - 1)  # nothing before the last mark's echo
    assert acted[-1] == [ActOnCall(hangup)]
    assert state.on_twilio(echo(marks[-1]), 1.1) == []  # once


def test_a_goodbye_spoken_before_the_call_still_waits_for_its_marks():
    state = CallState()
    start(state)
    state.on_realtime(created("resp_1"), 0.1)
    marks = sentence(state, "resp_1", "item_bye", 0.15)  # said first, then the call
    state.on_realtime(function_call(), 0.2)
    state.on_realtime(done("resp_1"), 0.3)
    state.tool_finished("call_1", "ok", 0.35, AfterPlayback("transfer", "+5516999990000"))
    state.on_realtime(created("resp_2"), 0.4)
    assert not [a for a in state.on_realtime(done("resp_2"), 0.5) if isinstance(a, ActOnCall)]
    actions = []
    for name in marks:
        actions += state.on_twilio(echo(name), 1.0)
    assert [a for a in actions if isinstance(a, ActOnCall)] == [
        ActOnCall(AfterPlayback("transfer", "+5516999990000"))
    ]


def test_a_model_that_keeps_calling_tools_is_made_to_speak():
    state = CallState()
    start(state)
    sent = []
    for n in range(1, 6):
        state.on_realtime(created(f"resp_{n}"), n)
        state.on_realtime(function_call(f"call_{n}", "save_lead", f"resp_{n}"), n)
        state.on_realtime(done(f"resp_{n}"), n)
        sent += realtime_events(state.tool_finished(f"call_{n}", "ok", n))
    creates = [e["response"] for e in sent if e["type"] == "response.create"]
    assert creates[:3] == [{}, {}, {}] and creates[3] == {"tool_choice": "none"}


def test_unusable_or_late_calls_are_protocol_errors_or_ignored():
    state = CallState()
    start(state)
    bad = function_call()
    del bad["call_id"]
    [error] = state.on_realtime(bad, 0.1)
    assert error.source == "realtime" and "call_id" in error.detail
    assert state.tool_finished("call_unknown", "ok", 0.2) == []
    state.on_realtime(function_call(), 0.3)
    state.end(0.4, "caller hung up")
    assert state.tool_finished("call_1", "ok", 0.5) == []  # the phone is gone
    assert not any(isinstance(a, SendRealtime) for a in state.on_realtime(done("resp_1"), 0.6))


def test_a_hang_up_asked_for_before_a_reconnect_still_happens_once_the_phone_is_quiet():
    state = CallState()
    start(state)
    state.on_realtime(created("resp_1"), 0.1)
    state.on_realtime(function_call(), 0.2)
    state.upstream_lost(0.3, "dropped")  # the session dies while the tool runs
    acted = state.tool_finished("call_1", "ok", 0.4, AfterPlayback("hangup"))
    assert acted == [ActOnCall(AfterPlayback("hangup"))]  # nothing left to play
    assert not any(isinstance(a, SendRealtime) for a in acted)
