"""Responses on a Realtime session: created, streamed as paced deltas, finished, billed.

A response's output is an assistant message (audio + transcript, or text) or, when a
`SimToolCall` knob matches its trigger, an optional message (`say_first`) followed by
`function_call` items whose arguments stream as `response.function_call_arguments.delta`.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import math
import time
from typing import NamedTuple

from simulators.realtime_audio import bytes_per_ms, reply_audio
from simulators.realtime_config import ARGUMENTS_DELTA_CHARS, RealtimeSimConfig, SimToolCall
from simulators.realtime_state import (
    Conversation,
    ConvItem,
    OfferedTools,
    SimResponse,
    ToolCallRecord,
    ToolLedger,
    _normalized,
    new_call_id,
    new_id,
)

log = logging.getLogger("simulators.realtime")  # the simulator's one logger, as before


class ResponseStreaming:
    """`response.create` / `response.cancel` and each response's stream of events.

    A mixin of `SimSession`, which provides emit, the conversation and the session config.
    """

    sim_config: RealtimeSimConfig
    config: dict
    conversation: Conversation
    conversation_id: str
    responses: list[SimResponse]
    audio_ms: float
    audio_output_started: bool
    ledger: ToolLedger
    _last_input_tokens: int

    # -- responses --

    def _on_response_create(self, raw: dict) -> None:
        params = raw.get("response") or {}
        out_of_band = params.get("conversation") == "none"
        active = self.active_response
        if active and not out_of_band:
            message = (
                f"Conversation already has an active response in progress: {active.id}. "
                "Wait until the response is finished before creating a new one."
            )
            return self._fail(message, "conversation_already_has_active_response", None, raw)
        for index, ref in enumerate(params.get("input") or []):
            if ref.get("type") == "item_reference" and ref["id"] not in self.conversation.items:
                message = f"Item with id '{ref['id']}' not found in the conversation."
                return self._fail(message, "invalid_value", f"response.input[{index}].id", raw)
        if not out_of_band:
            self.ledger.response_requested(time.monotonic())
        self.start_response(params, trigger=self.conversation.last_input_item())

    def _on_response_cancel(self, raw: dict) -> None:
        wanted = raw.get("response_id")
        active = [r for r in self.responses if r.active]
        if wanted:
            active = [r for r in active if r.id == wanted]
        else:
            active.sort(key=lambda r: not r.in_conversation)  # default conversation first
        if not active:
            message = "Cancellation failed: no active response found"
            return self._fail(message, "response_cancel_not_active", None, raw)
        self.finish_response(active[0], "cancelled", "client_cancelled")

    def start_response(self, params: dict | None, trigger: ConvItem | None) -> SimResponse:
        """Create a response (from response.create or VAD) and start streaming it."""
        params = params or {}
        out = params.get("audio", {}).get("output") or {}
        session_out = self.config["audio"]["output"]
        fmt = out.get("format") or session_out["format"]
        fmt = _normalized("audio.output.format", fmt, None)
        modalities = params.get("output_modalities") or self.config.get("output_modalities")
        resp = SimResponse(
            id=new_id("resp"),
            in_conversation=params.get("conversation") != "none",
            modality="text" if modalities == ["text"] else "audio",
            format=fmt,
            voice=out.get("voice") or session_out.get("voice"),
            max_output_tokens=params.get("max_output_tokens") or self.config["max_output_tokens"],
            metadata=params.get("metadata"),
            instructions=params.get("instructions") or self.config.get("instructions") or "",
            created_at=time.monotonic(),
        )
        if resp.in_conversation:
            self._plan_tool_calls(resp, params, trigger)
        self.responses.append(resp)
        self.emit("response.created", response=self._response_json(resp))
        self.emit("rate_limits.updated", rate_limits=self._rate_limits())
        resp.task = asyncio.ensure_future(self._stream(resp, trigger))
        return resp

    def _plan_tool_calls(self, resp: SimResponse, params: dict, trigger: ConvItem | None) -> None:
        """Which knobs this response calls (out-of-band responses call none)."""
        resp.answers_tool_output = trigger is not None and trigger.kind == "function_call_output"

        def matches(knob: SimToolCall) -> bool:
            if knob.trigger is None:
                return not resp.answers_tool_output
            if callable(knob.trigger):
                return bool(knob.trigger(self, trigger))
            if trigger is None or trigger.role != "user":
                return False
            return knob.trigger.casefold() in self.caller_said(trigger).casefold()

        offered = OfferedTools.of(params, self.config)
        resp.tool_calls = self.ledger.choose(
            self.sim_config.tool_calls, offered, matches, resp.id, time.monotonic()
        )

    def _response_json(self, resp: SimResponse) -> dict:
        output = [item.public() for item in resp.outputs]
        voice = resp.voice.get("id") if isinstance(resp.voice, dict) else resp.voice
        return {
            "object": "realtime.response",
            "id": resp.id,
            "status": resp.status,
            "status_details": resp.status_details,
            "output": output,
            "conversation_id": self.conversation_id if resp.in_conversation else None,
            "output_modalities": [resp.modality],
            "max_output_tokens": resp.max_output_tokens,
            "audio": {"output": {"format": resp.format, "voice": voice}},
            "usage": resp.usage,
            "metadata": resp.metadata,
        }

    def _rate_limits(self) -> list[dict]:
        used = sum(1 for _ in self.responses)
        return [
            {
                "name": "requests",
                "limit": 10_000,
                "remaining": 10_000 - used,
                "reset_seconds": 0.006,
            },
            {"name": "tokens", "limit": 2_000_000, "remaining": 1_995_000, "reset_seconds": 0.15},
        ]

    async def _reply_text(self, trigger: ConvItem | None) -> str:
        fn = self.sim_config.reply
        if fn is None:
            return self.sim_config.reply_text
        text = fn(self, trigger)
        return await text if inspect.isawaitable(text) else text

    async def _stream(self, resp: SimResponse, trigger: ConvItem | None) -> None:
        try:
            await self._stream_planned(resp, trigger)
        except Exception as exc:  # a broken reply function: fail like the server would
            log.exception("response %s failed", resp.id)
            error = {"type": "server_error", "code": None, "message": str(exc)}
            self.finish_response(resp, "failed", None, error)

    async def _stream_planned(self, resp: SimResponse, trigger: ConvItem | None) -> None:
        cfg = self.sim_config
        said = [k.say_first for k in resp.tool_calls if k.say_first]
        text = " ".join(said) if resp.tool_calls else await self._reply_text(trigger)
        speed = cfg.speed if cfg.speed > 0 else math.inf
        loop = asyncio.get_running_loop()
        t0 = loop.time() + cfg.first_audio_latency_ms / 1000 - (time.monotonic() - resp.created_at)
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        if text or not resp.tool_calls:
            plan = plan_reply(resp, text, cfg)
            resp.text = plan.text
            self._open_item(resp, plan)
            # text is paced by its own rate (plan_reply), audio `speed` x faster than real time
            pace = speed if resp.modality == "audio" or math.isinf(speed) else 1.0
            for chunk in plan.chunks:
                await asyncio.sleep(max(0.0, t0 + chunk.offset_ms / 1000 / pace - loop.time()))
                self._send_chunk(resp, chunk)
            if not resp.tool_calls or plan.status != "completed":
                return self.finish_response(resp, plan.status, plan.reason)
            self._close_part(resp, "completed")
            resp.stage = "spoken"
        for knob in resp.tool_calls:
            await self._stream_call(resp, knob, cfg.delta_ms / 1000 / speed)
        self.finish_response(resp, "completed")

    async def _stream_call(self, resp: SimResponse, knob: SimToolCall, step_s: float) -> None:
        """One function_call output item: added, its arguments in deltas, done."""
        arguments = knob.arguments_json()
        item_id, call_id = new_id("item"), new_call_id()
        data = {"id": item_id, "type": "function_call", "object": "realtime.item"}
        data |= {"status": "in_progress", "name": knob.name, "call_id": call_id, "arguments": ""}
        item = ConvItem(item_id, data, response_id=resp.id)
        index = len(resp.outputs)
        resp.outputs.append(item)
        resp.open_call = item
        record = ToolCallRecord(call_id, knob.name, arguments, item_id, resp.id, time.monotonic())
        resp.calls.append(record)
        self.ledger.calls.append(record)
        ids = {"response_id": resp.id, "output_index": index}
        self.emit("response.output_item.added", **ids, item=item.public())
        if resp.in_conversation:
            previous = self.conversation.insert(item)
            self.emit("conversation.item.added", previous_item_id=previous, item=item.public())
        ids |= {"item_id": item_id, "call_id": call_id}
        count = max(1, math.ceil(len(arguments) / ARGUMENTS_DELTA_CHARS))
        for piece in _split(arguments, count):
            await asyncio.sleep(step_s)
            data["arguments"] += piece
            self.emit("response.function_call_arguments.delta", **ids, delta=piece)
        self._close_call(resp, "completed")

    def _close_call(self, resp: SimResponse, status: str) -> None:
        """The open function_call item is done: completed, or incomplete when cut short."""
        item, record = resp.open_call, resp.calls[-1]
        assert item is not None
        resp.open_call = None
        data, index = item.data, resp.outputs.index(item)
        ids = {"response_id": resp.id, "item_id": item.id, "output_index": index}
        self.emit(
            "response.function_call_arguments.done",
            **ids,
            call_id=record.call_id,
            name=record.name,
            arguments=data["arguments"],
        )
        data["status"] = record.status = status
        record.done_at = time.monotonic()
        del ids["item_id"]
        self.emit("response.output_item.done", **ids, item=item.public())
        self._item_done(resp, item)

    def _open_item(self, resp: SimResponse, plan: _Plan) -> None:
        audio = resp.modality == "audio"
        item_id = new_id("item")
        data = {"id": item_id, "type": "message", "object": "realtime.item"}
        data |= {"status": "in_progress", "role": "assistant", "content": []}
        resp.item = ConvItem(item_id, data, bytearray(), resp.format["type"] if audio else None)
        resp.item.full_transcript, resp.item.full_audio_ms = plan.full_text, plan.duration_ms
        resp.item.response_id = resp.id
        resp.outputs.append(resp.item)
        resp.stage = "item"
        ids = {"response_id": resp.id, "output_index": 0}
        self.emit("response.output_item.added", **ids, item=resp.item.public())
        if resp.in_conversation:
            previous = self.conversation.insert(resp.item)
            self.emit("conversation.item.added", previous_item_id=previous, item=resp.item.public())
        empty = (
            {"type": "output_audio", "transcript": ""}
            if audio
            else {"type": "output_text", "text": ""}
        )
        data["content"].append(empty)
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        resp.stage = "part"
        self.emit("response.content_part.added", **ids, item_id=item_id, content_index=0, part=part)

    def _send_chunk(self, resp: SimResponse, chunk: _Chunk) -> None:
        assert resp.item is not None
        ids = {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0}
        ids["content_index"] = 0
        if chunk.audio:
            if resp.first_audio_at is None:
                resp.first_audio_at = time.monotonic()
                resp.first_audio_timeline_ms = self.audio_ms
                self.audio_output_started = True
            resp.item.audio += chunk.audio
            resp.audio_sent += len(chunk.audio)
            delta = base64.b64encode(chunk.audio).decode()
            self.emit("response.output_audio.delta", **ids, delta=delta)
        if chunk.text:
            if resp.first_audio_at is None and resp.modality == "text":
                resp.first_audio_at = time.monotonic()  # a text reply's first output
            resp.sent_text += chunk.text
            kind = "output_audio_transcript" if resp.modality == "audio" else "output_text"
            self.emit(f"response.{kind}.delta", **ids, delta=chunk.text)

    def finish_response(
        self, resp: SimResponse, status: str, reason: str | None = None, error: dict | None = None
    ) -> None:
        """End a response now: close its open parts, then `response.done`."""
        if not resp.active:
            return
        if resp.task is not None and asyncio.current_task() is not resp.task:
            resp.task.cancel()
        resp.status = status
        if error is not None:
            resp.status_details = {"type": status, "error": error}
        elif status != "completed":
            resp.status_details = {"type": status, "reason": reason}
        if resp.stage == "part":
            self._close_part(resp, "completed" if status == "completed" else "incomplete")
        if resp.open_call is not None:
            self._close_call(resp, "incomplete")
        resp.stage = "finished"
        resp.usage = self._usage(resp)
        resp.done_at = time.monotonic()
        self.emit("response.done", response=self._response_json(resp))
        self._arm_idle(resp)

    def _close_part(self, resp: SimResponse, item_status: str) -> None:
        item = resp.item
        assert item is not None
        ids = {"response_id": resp.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        if resp.modality == "audio":
            transcript = resp.sent_text
            item.data["content"][0]["transcript"] = transcript
            self.emit("response.output_audio.done", **ids)
            self.emit("response.output_audio_transcript.done", **ids, transcript=transcript)
            part = {"type": "audio", "transcript": transcript}
        else:
            item.data["content"][0]["text"] = resp.sent_text
            self.emit("response.output_text.done", **ids, text=resp.sent_text)
            part = {"type": "text", "text": resp.sent_text}
        self.emit("response.content_part.done", **ids, part=part)
        item.data["status"] = item_status
        del ids["item_id"], ids["content_index"]
        self.emit("response.output_item.done", **ids, item=item.public())
        self._item_done(resp, item)

    def _item_done(self, resp: SimResponse, item: ConvItem) -> None:
        if resp.in_conversation and self.conversation.get(item.id) is item:
            previous = self._previous_of(item)
            self.emit("conversation.item.done", previous_item_id=previous, item=item.public())

    def _previous_of(self, item: ConvItem) -> str | None:
        index = self.conversation.order.index(item.id)
        return self.conversation.order[index - 1] if index > 0 else None

    def _usage(self, resp: SimResponse) -> dict:
        instructions = math.ceil(len(resp.instructions) / 4)
        text_in = audio_in = 0
        own = {item.id for item in resp.outputs}
        for item in self.conversation if resp.in_conversation else []:
            if item.id in own:
                continue
            text_in += math.ceil(len(item.text()) / 4)
            audio_in += math.ceil(item.audio_ms / (50 if item.role == "assistant" else 100))
        text_out = math.ceil(len(resp.sent_text) / 4)
        calls = [item for item in resp.outputs if item.kind == "function_call"]
        text_out += sum(math.ceil(len(item.text()) / 4) for item in calls)  # the arguments
        audio_out = math.ceil(resp.audio_ms / 50)  # ~20 output audio tokens per second
        input_tokens = instructions + text_in + audio_in
        cached = min(self._last_input_tokens, input_tokens) // 64 * 64
        self._last_input_tokens = input_tokens
        return {
            "total_tokens": input_tokens + text_out + audio_out,
            "input_tokens": input_tokens,
            "output_tokens": text_out + audio_out,
            "input_token_details": {
                "text_tokens": instructions + text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached,
                    "audio_tokens": 0,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }


# ---- response planning (pure) ----------------------------------------------------------


class _Chunk(NamedTuple):
    offset_ms: float  # position in the reply's own timeline (paced by `speed`)
    audio: bytes
    text: str


class _Plan(NamedTuple):
    text: str  # what will be streamed (cut when max_output_tokens is small)
    full_text: str  # what the model "meant to say"
    duration_ms: int
    chunks: list[_Chunk]
    status: str
    reason: str | None


def reply_duration_ms(text: str, cfg: RealtimeSimConfig) -> int:
    ms = int(len(text) * cfg.ms_per_char)
    return max(cfg.min_reply_ms, min(cfg.max_reply_ms, ms))


TOKEN_CHARS = 4  # characters per text delta: about one token of Portuguese


def _split(text: str, count: int) -> list[str]:
    return [text[len(text) * i // count : len(text) * (i + 1) // count] for i in range(count)]


def plan_reply(resp: SimResponse, text: str, cfg: RealtimeSimConfig) -> _Plan:
    """The deltas of a response: audio slices (+ transcript pieces) or text pieces."""
    full, duration = text, reply_duration_ms(text, cfg)
    status, reason = "completed", None
    audio_mode = resp.modality == "audio"
    tokens = math.ceil(len(text) / 4) + (math.ceil(duration / 50) if audio_mode else 0)
    if isinstance(resp.max_output_tokens, int) and tokens > resp.max_output_tokens:
        share = resp.max_output_tokens / tokens  # cut audio and text to the token budget
        duration, text = max(1, int(duration * share)), text[: int(len(text) * share)]
        status, reason = "incomplete", "max_output_tokens"
    step = max(1.0, cfg.delta_ms)
    if not audio_mode:
        pieces = _split(text, max(1, math.ceil(len(text) / TOKEN_CHARS)))
        token_ms = TOKEN_CHARS * 1000 / cfg.text_chars_per_s if cfg.text_chars_per_s > 0 else 0
        chunks = [_Chunk(i * token_ms, b"", piece) for i, piece in enumerate(pieces)]
        return _Plan(text, full, duration, chunks, status, reason)
    fmt = resp.format["type"]
    audio = reply_audio(fmt, duration)
    size = max(2, int(step * bytes_per_ms(fmt)))
    size -= size % 2 if fmt == "audio/pcm" else 0  # whole 16-bit samples
    count = math.ceil(len(audio) / size)
    pieces = _split(text, count)
    chunks = [
        _Chunk(i * size / bytes_per_ms(fmt), audio[i * size : (i + 1) * size], pieces[i])
        for i in range(count)
    ]
    return _Plan(text, full, duration, chunks, status, reason)
