"""Input audio on a Realtime session: the buffer, commits, transcription and server VAD."""

from __future__ import annotations

import asyncio
import time

from simulators.realtime_audio import (
    NOT_BASE64,
    EnergyVad,
    VadEvent,
    VadParams,
    bytes_per_ms,
    decoded_audio,
)
from simulators.realtime_config import MAX_APPEND_BYTES, MIN_COMMIT_MS, RealtimeSimConfig
from simulators.realtime_state import Conversation, ConvItem, SimResponse, ToolLedger, new_id


class InputAudio:
    """The caller's side of a session: `input_audio_buffer.*` events and turn detection.

    A mixin of `SimSession`, which provides emit, the conversation and response creation.
    """

    sim_config: RealtimeSimConfig
    config: dict
    conversation: Conversation
    committed: list[ConvItem]
    input_audio: bytearray
    audio_ms: float
    buffer: bytearray
    buffer_start_ms: float
    appends_received: int
    ledger: ToolLedger
    _vad: EnergyVad
    _vad_params: VadParams | None
    _speech_item_id: str | None
    _speech_start_ms: float

    # -- input audio buffer --

    def _on_input_audio_buffer_append(self, raw: dict) -> None:
        self.appends_received += 1
        data = decoded_audio(raw["audio"])
        if data is None:
            return self._fail(NOT_BASE64, "invalid_value", "audio", raw)
        if len(data) > MAX_APPEND_BYTES:
            message = (
                f"Invalid 'audio': the decoded audio is {len(data)} bytes, above the "
                f"maximum of {MAX_APPEND_BYTES} bytes (15 MiB) per event."
            )
            return self._fail(message, "invalid_value", "audio", raw)
        self.push_audio(data)

    def push_audio(self, data: bytes) -> None:
        """Append decoded input audio: buffer, timeline and (in VAD mode) turn detection."""
        start_ms = self.audio_ms
        fmt = self.input_format
        self.audio_ms += len(data) / bytes_per_ms(fmt)
        if self.sim_config.record_audio:
            self.input_audio += data
        self.buffer += data
        if self._vad_params is None:
            return
        for event in self._vad.feed(data, start_ms, fmt, self._vad_params):
            self._on_vad(event)
        if not self._vad.speaking:
            self._trim_idle_buffer()

    def _trim_idle_buffer(self) -> None:
        # While nobody speaks only the prefix padding (and the idle window) is needed.
        p = self._vad_params
        assert p is not None
        keep_from = self.audio_ms - (p.prefix_padding_ms + p.start_ms + 2 * EnergyVad.WINDOW_MS)
        if self._vad.run_start_ms is not None:
            keep_from = min(keep_from, self._vad.run_start_ms - p.prefix_padding_ms)
        if self._vad.idle_from_ms is not None:
            keep_from = min(keep_from, self._vad.idle_from_ms)
        cut = self._buffer_offset(keep_from)
        if cut > 0:
            del self.buffer[:cut]
            self.buffer_start_ms += cut / bytes_per_ms(self.input_format)

    def _buffer_offset(self, ms: float) -> int:
        bpm = bytes_per_ms(self.input_format)
        offset = round((ms - self.buffer_start_ms) * bpm)
        offset -= offset % (2 if self.input_format == "audio/pcm" else 1)
        return max(0, min(len(self.buffer), offset))

    def _take_buffer(self, start_ms: float, end_ms: float) -> bytes:
        """Audio [start_ms, end_ms) of the timeline; the buffer then starts at end_ms."""
        begin, end = self._buffer_offset(start_ms), self._buffer_offset(end_ms)
        audio = bytes(self.buffer[begin:end])
        del self.buffer[:end]
        self.buffer_start_ms = max(self.buffer_start_ms, end_ms)
        return audio

    def _on_input_audio_buffer_commit(self, raw: dict) -> None:
        buffered_ms = len(self.buffer) / bytes_per_ms(self.input_format)
        if buffered_ms < MIN_COMMIT_MS:
            message = (
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {buffered_ms:.2f}ms of audio."
            )
            return self._fail(message, "input_audio_buffer_commit_empty", None, raw)
        audio = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        self._vad.reset(self.audio_ms)
        self._speech_item_id = None
        self._commit(audio, new_id("item"))

    def _on_input_audio_buffer_clear(self, raw: dict) -> None:
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        self._vad.reset(self.audio_ms)
        self._speech_item_id = None
        self.emit("input_audio_buffer.cleared")

    def _on_output_audio_buffer_clear(self, raw: dict) -> None:
        message = "output_audio_buffer.clear is only supported for WebRTC and SIP connections."
        self._fail(message, "invalid_value", "type", raw)

    def _commit(self, audio: bytes, item_id: str) -> ConvItem:
        content = {"type": "input_audio", "transcript": None}
        data = {"id": item_id, "type": "message", "object": "realtime.item"}
        data |= {"status": "completed", "role": "user", "content": [content]}
        item = ConvItem(item_id, data, bytearray(audio), self.input_format)
        self.ledger.turn_started("the input audio buffer was committed", time.monotonic())
        previous = self.conversation.insert(item)
        self.committed.append(item)
        self.emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self._announce_item(item, previous)
        if self.config["audio"]["input"].get("transcription"):
            self._spawn(self._transcribe(item))
        return item

    def _announce_item(self, item: ConvItem, previous: str | None) -> None:
        self.emit("conversation.item.added", previous_item_id=previous, item=item.public())
        if self.sim_config.send_item_created:
            self.emit("conversation.item.created", previous_item_id=previous, item=item.public())
        self.emit("conversation.item.done", previous_item_id=previous, item=item.public())

    def caller_said(self, item: ConvItem) -> str:
        """What the caller said in a user item, as the model heard it: its text, or for audio
        the `input_transcript` knob (asked once per item), whether transcription is on or not."""
        if item.heard is None:
            text = item.text().strip()
            if not text and item.audio:
                source = self.sim_config.input_transcript
                text = source if isinstance(source, str) else source(self, item)
            item.heard = text
        return item.heard

    async def _transcribe(self, item: ConvItem) -> None:
        await asyncio.sleep(self.sim_config.transcription_latency_ms / 1000)
        text = self.caller_said(item)
        item.data["content"][0]["transcript"] = text
        ids = {"item_id": item.id, "content_index": 0}
        self.emit("conversation.item.input_audio_transcription.delta", **ids, delta=text)
        usage = {"type": "duration", "seconds": round(item.audio_ms / 1000, 3)}
        self.emit(
            "conversation.item.input_audio_transcription.completed",
            **ids,
            transcript=text,
            usage=usage,
        )

    # -- VAD --

    def _on_vad(self, event: VadEvent) -> None:
        if event.kind == "start":
            self._speech_started(event.ms)
        elif event.kind == "stop":
            self._speech_stopped(event.ms)
        else:
            self._idle_timeout(event.idle_from_ms, event.ms)

    def _speech_started(self, run_start_ms: float) -> None:
        p = self._vad_params
        assert p is not None
        start = max(self.buffer_start_ms, run_start_ms - p.prefix_padding_ms, 0.0)
        self._speech_item_id, self._speech_start_ms = new_id("item"), start
        self.emit(
            "input_audio_buffer.speech_started",
            audio_start_ms=int(start),
            item_id=self._speech_item_id,
        )
        self.ledger.turn_started("the caller started speaking", time.monotonic())
        turn = self.turn_detection or {}
        active = self.active_response
        if active and turn.get("interrupt_response", True):
            self.finish_response(active, "cancelled", "turn_detected")

    def _speech_stopped(self, end_ms: float) -> None:
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        self.emit("input_audio_buffer.speech_stopped", audio_end_ms=int(end_ms), item_id=item_id)
        item = self._commit(self._take_buffer(self._speech_start_ms, end_ms), item_id)
        turn = self.turn_detection or {}
        if turn.get("create_response", True) and self.active_response is None:
            self.start_response(None, trigger=item)

    def _idle_timeout(self, start: float, end_ms: float) -> None:
        item_id = new_id("item")
        self.emit(
            "input_audio_buffer.timeout_triggered",
            audio_start_ms=int(start),
            audio_end_ms=int(end_ms),
            item_id=item_id,
        )
        item = self._commit(self._take_buffer(start, end_ms), item_id)
        if self.active_response is None:
            self.start_response(None, trigger=item)

    def _arm_idle(self, resp: SimResponse) -> None:
        p = self._vad_params
        if p is None or p.idle_timeout_ms is None or not resp.in_conversation:
            return
        played_from = resp.first_audio_timeline_ms
        at = self.audio_ms if played_from is None else played_from + resp.audio_ms
        self._vad.arm_idle(max(at, self.buffer_start_ms))
