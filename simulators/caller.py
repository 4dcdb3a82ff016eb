"""A simulated phone caller that behaves like Twilio Media Streams on a bidirectional stream.

* `dial()` posts the signed voice webhook and reads `<Connect><Stream>` from the TwiML.
* `connect()` opens the WebSocket signed over the Stream URL, sends `connected` and `start`,
  then sends a 160-byte mu-law `media` frame every 20 ms on a drift-free monotonic schedule,
  always: silence (0xFF) when the caller is not speaking, like a real phone line.
* Audio from the gateway goes into a playback buffer drained in real time (8 bytes per ms).
  A `mark` is echoed once the audio queued before it has played; `clear` drops the buffer
  and echoes every pending mark at once. Anything that is not an exact Twilio shape is
  recorded as a protocol violation (Twilio would log 31950/31951).
* Its call is known to a `TwilioSimulator` (the one passed as `twilio=`, else the one
  `adopting_callers()` for its account) from the moment the stream starts: in-progress
  while the stream is live. When that simulator accepts a hangup or a redirect of the call
  over REST, Twilio's side ends the stream (`stop`, then the close; queued audio is cut,
  pending marks never echoed) and `ended_by_update` says when and what was cut.

Times are `loop.time()` (monotonic) seconds throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit
from xml.etree import ElementTree

import aiohttp
import orjson
from twilio.request_validator import RequestValidator

from gateway.runtime import SANDBOX_ACCOUNT_SID
from simulators.twilio import simulator_for
from simulators.waits import Waits

if TYPE_CHECKING:
    from simulators.twilio import SimCall, TwilioSimulator

API_VERSION = "2010-04-01"
VOICE_PATH = "/webhook/voice"
FRAME_BYTES = 160  # 20 ms of mu-law at 8 kHz
FRAME_S = 0.020
BYTES_PER_S = 8000
SILENCE = b"\xff" * FRAME_BYTES

# Exact shapes Twilio accepts from the server on a bidirectional stream.
_SHAPES: dict[str, tuple[frozenset[str], str | None, frozenset[str]]] = {
    "media": (frozenset({"event", "streamSid", "media"}), "media", frozenset({"payload"})),
    "mark": (frozenset({"event", "streamSid", "mark"}), "mark", frozenset({"name"})),
    "clear": (frozenset({"event", "streamSid"}), None, frozenset()),
}


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _country(number: str) -> str:
    return "BR" if number.startswith("+55") else "US" if number.startswith("+1") else ""


@dataclass
class DialResult:
    status: int
    body: str
    call_sid: str
    stream_url: str | None
    parameters: dict[str, str]
    elapsed_s: float


@dataclass
class Received:
    at: float
    event: str | None
    message: dict[str, Any] | None


@dataclass
class Violation:
    at: float
    code: int  # 31950 binary frame, 31951 invalid message
    reason: str
    raw: str


@dataclass
class MarkRecord:
    name: str
    received_at: float
    due_at: float  # when the audio queued before it finishes playing
    echoed_at: float | None = None
    played_bytes: int = 0  # total audio played when it was echoed
    cleared: bool = False


@dataclass
class StreamEnd:
    """Twilio ended the stream because the call was updated over REST (not a hangup by the
    caller, not a close by the gateway)."""

    reason: str  # "completed" (Status=completed) | "redirect" (new Twiml or Url)
    at: float  # when `stop` went out
    unplayed_bytes: int  # gateway audio still queued then: cut, never heard
    pending_marks: list[str]  # marks not echoed by then: never echoed


@dataclass
class ClearRecord:
    at: float
    discarded_bytes: int
    marks_flushed: list[str]


@dataclass
class Turn:
    """One caller utterance and the gateway's reaction to it."""

    index: int
    speech_start: float
    speech_end: float | None = None  # when the last speech frame was sent
    first_reply_at: float | None = None  # arrival of the first media frame after speech_end
    first_reply_audible_at: float | None = None  # when that frame starts playing

    @property
    def latency_s(self) -> float | None:
        if self.speech_end is None or self.first_reply_at is None:
            return None
        return self.first_reply_at - self.speech_end


class PlaybackBuffer:
    """Twilio's outbound audio buffer on a real-time clock: no I/O, just arithmetic."""

    def __init__(self) -> None:
        self.play_end = 0.0
        self.queued_bytes = 0
        self.discarded_bytes = 0

    def enqueue(self, nbytes: int, now: float) -> float:
        """Queue audio; returns when it starts playing."""
        start = max(now, self.play_end)
        self.play_end = start + nbytes / BYTES_PER_S
        self.queued_bytes += nbytes
        return start

    def remaining(self, now: float) -> int:
        return round(max(0.0, self.play_end - now) * BYTES_PER_S)

    def played(self, now: float) -> int:
        return self.queued_bytes - self.discarded_bytes - self.remaining(now)

    def clear(self, now: float) -> int:
        dropped = self.remaining(now)
        self.discarded_bytes += dropped
        self.play_end = min(self.play_end, now)
        return dropped


def validate_message(raw: str, stream_sid: str) -> tuple[dict[str, Any] | None, str | None]:
    """(message, None) if it is an exact Twilio server->Twilio shape, else (parsed|None, reason)."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(message, dict):
        return None, "not a JSON object"
    event = message.get("event")
    shape = _SHAPES.get(event) if isinstance(event, str) else None
    if shape is None:
        return message, f"unknown event {event!r}"
    keys, inner_key, inner_keys = shape
    if set(message) != keys:
        return message, f"fields {sorted(message)} != {sorted(keys)}"
    if message["streamSid"] != stream_sid:
        return message, "wrong streamSid"
    if inner_key is None:
        return message, None
    inner = message[inner_key]
    if not isinstance(inner, dict) or set(inner) != inner_keys:
        return message, f"{inner_key} must be an object with exactly {sorted(inner_keys)}"
    value = inner[next(iter(inner_keys))]
    if not isinstance(value, str):
        return message, f"{inner_key} value must be a string"
    if inner_key == "media":
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            return message, "payload is not valid base64"
    return message, None


class SimulatedCaller:
    """One phone call through (simulated) Twilio into the gateway. See the module docstring."""

    def __init__(
        self,
        gateway_url: str,
        public_base_url: str,
        auth_token: str,
        account_sid: str,
        from_number: str = "+5516999990001",
        to_number: str = "+551633334444",
        *,
        twilio: TwilioSimulator | None = None,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.twilio = twilio  # None: the simulator adopting callers of this account, if any
        self.twilio_call: SimCall | None = None  # the simulator's record, once streaming
        self.public_base_url = public_base_url.rstrip("/")
        self._validator = RequestValidator(auth_token)
        self.account_sid = account_sid
        self.from_number = from_number
        self.to_number = to_number
        self.call_sid = new_sid("CA")
        self.stream_sid = new_sid("MZ")
        self.dial_result: DialResult | None = None
        self.playback = PlaybackBuffer()
        # Records.
        self.received: list[Received] = []
        self.violations: list[Violation] = []
        self.marks: list[MarkRecord] = []
        self.clears: list[ClearRecord] = []
        self.turns: list[Turn] = []
        self.audio_received = bytearray()
        self.media_frames_sent = 0
        self.started_at: float | None = None
        self.first_reply_at: float | None = None
        self.last_media_at: float | None = None
        self.last_speech_frame_at: float | None = None
        self.closed = asyncio.Event()
        self.closed_by_server = False
        self.close_code: int | None = None
        self.stream_ended_at: float | None = None
        self.ended_by_update: StreamEnd | None = None
        # Internals.
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._speech = bytearray()
        self._speaking = False
        self._pending_marks: deque[MarkRecord] = deque()
        self._marks_wakeup = asyncio.Event()
        self._waits = Waits()  # re-checked where the records change: see `wait_until`
        self._frames_flowing = False  # the media loop re-checks the waits every frame
        self._tasks: list[asyncio.Task[None]] = []
        self._media_task: asyncio.Task[None] | None = None
        self._hanging_up = False

    # ---- call setup ------------------------------------------------------------------------

    def voice_form(self) -> dict[str, str]:
        """The voice webhook form Twilio posts for an inbound call that is ringing."""
        form = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.call_sid,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "From": self.from_number,
            "To": self.to_number,
            "Caller": self.from_number,
            "Called": self.to_number,
        }
        callers = (self.from_number, self.from_number, self.to_number, self.to_number)
        for alias, number in zip(("From", "Caller", "To", "Called"), callers, strict=True):
            form[f"{alias}Country"] = _country(number)
            form |= {f"{alias}State": "", f"{alias}City": "", f"{alias}Zip": ""}
        return form

    async def dial(self) -> DialResult:
        """POST the signed voice webhook; parse `<Connect><Stream url>` and its Parameters."""
        form = self.voice_form()
        signature = self._validator.compute_signature(self.public_base_url + VOICE_PATH, form)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        started = time.monotonic()
        session = self._http()
        timeout = aiohttp.ClientTimeout(total=15)
        async with session.post(
            self.gateway_url + VOICE_PATH, data=form, headers=headers, timeout=timeout
        ) as response:
            body = await response.text()
            status = response.status
        stream_url, parameters = self._parse_twiml(body) if status == 200 else (None, {})
        self.dial_result = DialResult(
            status, body, self.call_sid, stream_url, parameters, time.monotonic() - started
        )
        return self.dial_result

    def _parse_twiml(self, body: str) -> tuple[str | None, dict[str, str]]:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            return None, {}
        stream = root.find("./Connect/Stream")
        if stream is None or not stream.get("url"):
            return None, {}
        url = urljoin(self.public_base_url + VOICE_PATH, stream.get("url", ""))
        # A relative Stream url resolves against the webhook; Twilio then uses wss for it.
        scheme = urlsplit(url).scheme
        url = {"https": "wss", "http": "ws"}.get(scheme, scheme) + url[len(scheme) :]
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return url, params

    async def connect(
        self, stream_url: str | None = None, parameters: dict[str, str] | None = None
    ) -> None:
        """Open the media WebSocket and start streaming. Raises on a refused handshake."""
        if stream_url is None:
            if self.dial_result is None or self.dial_result.stream_url is None:
                raise RuntimeError("no Stream url: dial() first or pass stream_url")
            stream_url = self.dial_result.stream_url
            parameters = self.dial_result.parameters if parameters is None else parameters
        # Connect to the gateway's real address, but sign the public URL Twilio was given.
        signature = self._validator.compute_signature(stream_url, {})
        target = urlsplit(stream_url)
        gateway = urlsplit(self.gateway_url)
        ws_scheme = "wss" if gateway.scheme == "https" else "ws"
        url = urlunsplit((ws_scheme, gateway.netloc, target.path or "/", target.query, ""))
        self._ws = await self._http().ws_connect(
            url,
            headers={"X-Twilio-Signature": signature, "User-Agent": "Twilio.TmeWs/1.0"},
            autoping=True,
            heartbeat=None,
        )
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(self._start_message(parameters or {}), numbered=True)
        self.started_at = asyncio.get_running_loop().time()
        loop = asyncio.get_running_loop()
        self._media_task = loop.create_task(self._media_loop())
        self._tasks = [self._media_task]
        self._tasks += [
            loop.create_task(self._receive_loop()),
            loop.create_task(self._marks_loop()),
        ]
        host = self.twilio or simulator_for(self.account_sid)
        if host is not None:
            self.twilio_call = host.adopt(self)

    def _start_message(self, parameters: dict[str, str]) -> dict[str, Any]:
        return {
            "event": "start",
            "sequenceNumber": None,
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": dict(parameters),
            },
        }

    # ---- caller actions --------------------------------------------------------------------

    def speak(self, mulaw: bytes) -> None:
        """Queue caller audio; it replaces silence in the next 20 ms frames."""
        self._speech += mulaw

    async def speak_and_wait(self, mulaw: bytes, reply_timeout: float | None = 10.0) -> Turn:
        """Speak, wait until the last speech frame is sent, then (optionally) for the reply."""
        if not mulaw:
            raise ValueError("nothing to say")
        self.speak(mulaw)
        drain_s = len(self._speech) / BYTES_PER_S + 5.0
        await self.wait_until(lambda: not self._speech and not self._speaking, drain_s)
        turn = self.turns[-1]
        if reply_timeout is not None:
            await self.wait_until(lambda: turn.first_reply_at is not None, reply_timeout)
        return turn

    async def send_dtmf(self, digit: str) -> None:
        message = {
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": None,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
        await self._send(message, numbered=True)

    async def hangup(self) -> None:
        """Caller hangs up: Twilio sends `stop`, then closes the WebSocket."""
        if self._ws is None or self._hanging_up:
            return
        self._hanging_up = True
        self._stop_media()  # nothing after stop
        stop = {
            "event": "stop",
            "sequenceNumber": None,
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
        }
        await self._send(stop, numbered=True)
        await self._ws.close()
        await self._stop_tasks()

    @property
    def stream_live(self) -> bool:
        """The media stream is up: started, and neither side has ended it."""
        return self._ws is not None and not self._ws.closed and not self._hanging_up

    async def end_stream(self, reason: str) -> None:
        """Twilio's side ends the stream because the call was hung up or redirected over REST:
        `stop`, then the close, as on a hangup; what was cut is in `ended_by_update`."""
        if not self.stream_live:
            return
        now = asyncio.get_running_loop().time()
        pending = [m.name for m in self._pending_marks]
        self.ended_by_update = StreamEnd(reason, now, self.playback.remaining(now), pending)
        await self.hangup()

    async def close(self) -> None:
        """Release everything (does not send `stop`; use hangup() for a polite end)."""
        self._hanging_up = True
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        await self._stop_tasks()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SimulatedCaller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stop_media(self) -> None:
        if self._media_task is not None:
            self._media_task.cancel()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def bytes_played(self) -> int:
        """Gateway audio the caller has heard so far (cleared audio excluded)."""
        return self.playback.played(asyncio.get_running_loop().time())

    # ---- waiting helpers -------------------------------------------------------------------

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float | None = 5.0,  # noqa: ASYNC109 - test-facing convenience
    ) -> None:
        """Wait for a condition on the records; TimeoutError if it does not become true.

        Re-checked whenever the records change: each frame sent (every 20 ms while the
        stream is up), each message received, each mark echoed, the close. So a condition
        on the playback clock or on state outside the caller is seen within a frame; while
        no frames go out (before connect, after the stream ends) a 20 ms timer stands in.
        """
        loop = asyncio.get_running_loop()

        def between_frames() -> float | None:
            return None if self._frames_flowing else loop.time() + FRAME_S

        await self._waits.wait(predicate, timeout, between_frames)

    async def wait_playback_idle(
        self,
        quiet_s: float = 0.5,
        timeout: float = 30.0,  # noqa: ASYNC109 - test-facing convenience
    ) -> None:
        """Until the buffer has played out and no audio arrived for `quiet_s`."""
        loop = asyncio.get_running_loop()

        def idle() -> bool:
            now = loop.time()
            last = self.last_media_at or self.started_at or now
            return self.playback.remaining(now) == 0 and now - last >= quiet_s

        def idle_at() -> float:  # media arriving or a clear moves it: re-armed on each check
            last = self.last_media_at or self.started_at or loop.time()
            return max(self.playback.play_end, last + quiet_s)

        await self._waits.wait(idle, timeout, idle_at)

    # ---- outbound: frames on a monotonic schedule ------------------------------------------

    async def _send(self, message: dict[str, Any], *, numbered: bool = False) -> bool:
        """Serialize sends so sequenceNumbers follow wire order."""
        ws = self._ws
        if ws is None or ws.closed:
            return False
        async with self._send_lock:
            if numbered:
                self._seq += 1
                message["sequenceNumber"] = str(self._seq)
            try:
                await ws.send_str(orjson.dumps(message).decode())
            except (ConnectionError, RuntimeError):
                return False
        return True

    async def _media_loop(self) -> None:
        self._frames_flowing = True
        try:
            await self._send_frames()
        finally:
            self._frames_flowing = False
            self._waits.check()  # re-arms the waits' own 20 ms timers

    async def _send_frames(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.started_at is not None
        chunk = 0
        while True:
            chunk += 1
            # Deadlines come from the start time, not the previous send: no drift; after a
            # stall the backlog goes out at once, like Twilio's jitter buffer.
            delay = self.started_at + chunk * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            payload, is_speech = self._next_frame()
            message = {
                "event": "media",
                "sequenceNumber": None,
                "streamSid": self.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(chunk),
                    "timestamp": str(chunk * 20),
                    "payload": base64.b64encode(payload).decode(),
                },
            }
            if not await self._send(message, numbered=True):
                return
            self.media_frames_sent += 1
            if is_speech:
                self._after_speech_frame(loop.time())
            self._waits.check()

    def _next_frame(self) -> tuple[bytes, bool]:
        if not self._speech:
            return SILENCE, False
        frame = bytes(self._speech[:FRAME_BYTES])
        del self._speech[:FRAME_BYTES]
        self._speaking = True
        return frame.ljust(FRAME_BYTES, b"\xff"), True

    def _after_speech_frame(self, now: float) -> None:
        if not self.turns or self.turns[-1].speech_end is not None:
            self.turns.append(Turn(index=len(self.turns), speech_start=now))
        self.last_speech_frame_at = now
        if not self._speech:
            self.turns[-1].speech_end = now
            self._speaking = False

    # ---- inbound: validation, playback, marks ----------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        loop = asyncio.get_running_loop()
        try:
            async for msg in self._ws:
                now = loop.time()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data, now)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._violation(now, 31950, "binary frame", repr(msg.data[:64]))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
                self._waits.check()
        finally:
            self.stream_ended_at = loop.time()
            self.close_code = self._ws.close_code
            self.closed_by_server = not self._hanging_up
            self.closed.set()
            if self.closed_by_server:
                self._stop_media()  # the line is dead
            self._waits.check()

    def _violation(self, now: float, code: int, reason: str, raw: str) -> None:
        self.violations.append(Violation(now, code, reason, raw[:200]))

    async def _on_text(self, raw: str, now: float) -> None:
        message, problem = validate_message(raw, self.stream_sid)
        self.received.append(Received(now, message.get("event") if message else None, message))
        if problem is not None:
            self._violation(now, 31951, problem, raw)
            return
        assert message is not None
        event = message["event"]
        if event == "media":
            self._on_media(base64.b64decode(message["media"]["payload"]), now)
        elif event == "mark":
            self._on_mark(message["mark"]["name"], now)
            await self._echo_due(now)
        else:
            await self._on_clear(now)

    def _on_media(self, audio: bytes, now: float) -> None:
        starts_at = self.playback.enqueue(len(audio), now)
        self.audio_received += audio
        self.last_media_at = now
        if self.first_reply_at is None:
            self.first_reply_at = now
        turn = self.turns[-1] if self.turns else None
        if turn and turn.speech_end is not None and turn.first_reply_at is None:
            turn.first_reply_at = now
            turn.first_reply_audible_at = starts_at

    def _on_mark(self, name: str, now: float) -> None:
        record = MarkRecord(name, received_at=now, due_at=max(now, self.playback.play_end))
        self.marks.append(record)
        self._pending_marks.append(record)
        self._marks_wakeup.set()

    async def _on_clear(self, now: float) -> None:
        dropped = self.playback.clear(now)
        flushed = list(self._pending_marks)
        self._pending_marks.clear()
        self.clears.append(ClearRecord(now, dropped, [m.name for m in flushed]))
        for record in flushed:
            record.cleared = True
            await self._echo(record, now)

    async def _echo_due(self, now: float) -> None:
        while self._pending_marks and self._pending_marks[0].due_at <= now:
            await self._echo(self._pending_marks.popleft(), now)

    async def _echo(self, record: MarkRecord, now: float) -> None:
        if self._hanging_up:
            return  # nothing after `stop`
        record.echoed_at = now
        record.played_bytes = self.playback.played(now)
        message = {
            "event": "mark",
            "sequenceNumber": None,
            "streamSid": self.stream_sid,
            "mark": {"name": record.name},
        }
        await self._send(message, numbered=True)
        self._waits.check()

    async def _marks_loop(self) -> None:
        """Echo each pending mark when the audio before it has finished playing."""
        loop = asyncio.get_running_loop()
        while True:
            self._marks_wakeup.clear()
            delay = None
            if self._pending_marks:
                delay = self._pending_marks[0].due_at - loop.time()
                if delay <= 0:
                    await self._echo_due(loop.time())
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._marks_wakeup.wait(), delay)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Place one simulated call against a gateway.")
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument(
        "--public-base-url",
        default=os.environ.get("PUBLIC_BASE_URL"),
        help="the origin the gateway validates signatures against (default: --gateway)",
    )
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"))
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", SANDBOX_ACCOUNT_SID)
    )
    parser.add_argument("--from", dest="from_number", default="+5516999990001")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--speech-ms", type=int, default=1500)
    parser.add_argument("--reply-timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    args.public_base_url = args.public_base_url or args.gateway
    if not args.auth_token:
        parser.error("TWILIO_AUTH_TOKEN is required (env or --auth-token)")
    asyncio.run(_call(args))


async def _call(args: argparse.Namespace) -> None:
    from simulators.speech import speech_mulaw

    async with SimulatedCaller(
        args.gateway, args.public_base_url, args.auth_token, args.account_sid, args.from_number
    ) as caller:
        dialed = await caller.dial()
        ms = dialed.elapsed_s * 1000
        print(f"dial: HTTP {dialed.status} in {ms:.0f} ms, stream {dialed.stream_url}")
        if dialed.stream_url is None:
            print(dialed.body)
            raise SystemExit(1)
        await caller.connect()
        await caller.wait_until(lambda: caller.first_reply_at is not None, args.reply_timeout)
        greeting_ms = (caller.first_reply_at - caller.started_at) * 1000  # type: ignore[operator]
        print(f"greeting: first frame {greeting_ms:.0f} ms after the stream started")
        await caller.wait_playback_idle(quiet_s=0.8, timeout=args.reply_timeout)
        for i in range(args.turns):
            try:
                turn = await caller.speak_and_wait(
                    speech_mulaw(args.speech_ms, seed=i), args.reply_timeout
                )
                print(f"turn {i + 1}: first reply after {turn.latency_s * 1000:.0f} ms")  # type: ignore[operator]
                await caller.wait_playback_idle(quiet_s=0.8, timeout=60)
            except TimeoutError:
                print(f"turn {i + 1}: no reply within {args.reply_timeout:.0f} s")
            if caller.closed.is_set():
                print(f"gateway closed the stream (code {caller.close_code})")
                break
        await caller.hangup()
        print(f"media frames sent {caller.media_frames_sent}, received {len(caller.received)} "
              f"messages, {len(caller.violations)} protocol violations")  # fmt: skip
        for violation in caller.violations[:10]:
            print(f"  {violation.code} {violation.reason}: {violation.raw}")
        if caller.violations:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
