"""WhatsApp: POST /webhook/whatsapp, POST /webhook/whatsapp/status, and the message pipeline.

The webhook checks Twilio's signature and then the identifiers' formats (a signature holds
for a captured form re-split into other fields, see gateway.twilio_fields), stores the
message in the durable queue (keyed by MessageSid) and answers an empty TwiML at once: the
reply can take longer than the 15 s Twilio waits, so it goes back through the REST API. A
worker (gateway.inbound_queue) runs each row through the pipeline, one small function per step:

    download -> decode -> Realtime turn (gateway.whatsapp_turns) -> publish (gateway.media) -> send

The reply is saved before it is sent and each sent part is recorded, so a retry or a restart
resends only what is missing. Bad input (an image, a broken, truncated, huge or endlessly
slow file, a MediaUrl that is not http(s), an empty message) gets a short fixed reply from
the persona at once, never a crash; logs carry the MessageSid and at most a masked phone
number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import takewhile
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import encode_basic_auth, web
from twilio.base.exceptions import TwilioRestException, TwilioServiceException

from gateway import media
from gateway.fixed_voices import FixedVoices
from gateway.inbound_queue import Defer, GiveUp, InboundWorker, Intake, RetryLater
from gateway.observability import (
    ERRORS,
    TURNS,
    WHATSAPP_LIMITED,
    WHATSAPP_REPLY,
    WHATSAPP_WEBHOOK,
    correlated,
)
from gateway.phones import mask_number, normalize_number
from gateway.privacy import note_erasure_request
from gateway.runtime import RUNTIME, Runtime
from gateway.store import Erased, InboundMessage
from gateway.store.store import CREATING, Arrival, WhatsAppReply
from gateway.transcode import AudioDecodeError, decode_to_pcm24k
from gateway.twilio_api import media_auth_allowed, signature_refused
from gateway.twilio_fields import BadFields, check_message_status, check_whatsapp_message
from gateway.whatsapp_turns import (
    AudioInput,
    PersonErased,
    RealtimeUnavailable,
    TextInput,
    TurnInput,
    VoiceReply,
    WarmSessions,
)

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook/whatsapp"
STATUS_PATH = "/webhook/whatsapp/status"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
TEXT_LIMIT = 1600  # Twilio refuses longer bodies (21617)
SEND_RETRY_DELAYS_S = (0.25, 0.5, 1.0)  # in-line retries of a Twilio 5xx/429; then the queue's
SEND_GRACE_S = 2.0  # at shutdown, how long a started Twilio request may still take
MEDIA_NOT_FOUND_RETRY_S = (1.0, 2.0)  # Twilio's media can 404 briefly right after the webhook
MAX_REDIRECTS = 5
# No total here: one deadline (settings.media_read_deadline_s) covers the whole download.
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10)
MEDIA_SCHEMES = ("http", "https")
READ_CHUNK = 64 * 1024
OUTSIDE_WINDOW = 63016
CLOCK_SKEW = timedelta(seconds=30)  # ours against Twilio's date_created (whole seconds)
LOOKBACK_MESSAGES = 20  # a reply is a few parts; a person is answered one message at a time
WAIT_NOTICE_PART = -1  # "I'll answer shortly", sent before the reply's parts (0, 1, ...)
# Messages without media that are not text either: the persona's "unsupported" reply.
NOT_TEXT_TYPES = ("location", "contacts", "sticker", "interactive", "reaction")


# ---- the inbound message ----------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """The fields of Twilio's webhook the pipeline uses."""

    message_sid: str
    person_id: int
    sender: str  # whatsapp:+55..., the person
    recipient: str  # whatsapp:+1..., our number: replies go out from it
    body: str
    num_media: int
    media_url: str | None
    media_type: str
    message_type: str

    @classmethod
    def from_message(cls, message: InboundMessage) -> Inbound:
        form = message.payload
        try:
            num_media = int(form.get("NumMedia") or 0)
        except ValueError:
            num_media = 0
        return cls(
            message_sid=message.message_sid,
            person_id=message.person_id,
            sender=str(form.get("From", "")),
            recipient=str(form.get("To", "")),
            body=str(form.get("Body", "")),
            num_media=num_media,
            media_url=form.get("MediaUrl0") or None,
            media_type=str(form.get("MediaContentType0", "")).split(";")[0].strip().lower(),
            message_type=str(form.get("MessageType", "")).lower(),
        )


def classify(inbound: Inbound) -> str:
    """One of: audio (any audio/* media), text, unsupported (other media), empty."""
    if inbound.num_media > 0 and inbound.media_url:
        return "audio" if inbound.media_type.startswith("audio/") else "unsupported"
    if inbound.message_type in NOT_TEXT_TYPES:
        return "unsupported"
    return "text" if inbound.body.strip() else "empty"


class BadInput(Exception):
    """A message the model should not see; `key` names the persona's fixed reply."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key = key
        self.detail = detail


class MediaUnavailable(Exception):
    """A transient download failure (5xx, 429, network): retry the message later."""


# ---- step 1: download -------------------------------------------------------------------


@dataclass(frozen=True)
class MediaAuth:
    """Basic credentials, sent only to our account's media URLs on Twilio's API host."""

    api_base_url: str
    account_sid: str
    auth_token: str

    def header_for(self, url: str) -> dict[str, str]:
        if media_auth_allowed(url, self.api_base_url, self.account_sid):
            return {"Authorization": encode_basic_auth(self.account_sid, self.auth_token)}
        return {}


@dataclass(frozen=True)
class Download:
    data: bytes
    content_length: int | None


async def download_media(
    http: aiohttp.ClientSession, url: str, auth: MediaAuth, max_bytes: int, deadline_s: float
) -> Download:
    """GET a MediaUrl, all of it (404 retries, redirects, body) within one deadline.

    A host still dripping the file at the deadline is a permanent failure, like a broken
    file: the person is asked to send it again. A retry would hold a worker slot for another
    full deadline per attempt (minutes over the queue's attempts) while Twilio's CDN delivers
    a voice note in well under a second: a host that slow will not do better next time.
    """
    _check_media_url(url)
    deadline = asyncio.timeout(deadline_s)
    try:
        async with deadline:
            return await _download(http, url, auth, max_bytes)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise BadInput("corrupt_audio", f"media not read within {deadline_s:g} s") from None


def _check_media_url(url: str) -> None:
    """Only an http(s) URL with a host is fetched: file:, ftp: or garbage fails at once."""
    try:
        parts = urlsplit(url)
        fetchable = parts.scheme in MEDIA_SCHEMES and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        fetchable = False
    if not fetchable:
        raise BadInput("corrupt_audio", "media URL is not an http(s) URL")


async def _download(
    http: aiohttp.ClientSession, url: str, auth: MediaAuth, max_bytes: int
) -> Download:
    """A brief 404 is retried, as Twilio's media can lag the webhook."""
    for delay in (*MEDIA_NOT_FOUND_RETRY_S, None):
        status, result = await _fetch(http, url, auth, max_bytes)
        if result is not None:
            return result
        if status == 404 and delay is not None:
            await asyncio.sleep(delay)
            continue
        if status == 429 or status >= 500:
            raise MediaUnavailable(f"media host answered HTTP {status}")
        if status in (401, 403):
            # Our credentials were refused: a configuration problem, not the person's file.
            raise BadInput("processing_error", f"media download refused: HTTP {status}")
        raise BadInput("corrupt_audio", f"media not downloadable: HTTP {status}")
    raise AssertionError("unreachable")


async def _fetch(
    http: aiohttp.ClientSession, url: str, auth: MediaAuth, max_bytes: int
) -> tuple[int, Download | None]:
    """Follow redirects by hand so each hop gets credentials only if it is Twilio's API."""
    hop = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            async with http.get(
                hop, headers=auth.header_for(hop), allow_redirects=False, timeout=DOWNLOAD_TIMEOUT
            ) as response:
                if response.status in (301, 302, 303, 307, 308):
                    hop = _redirect_target(hop, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    return response.status, None
                return 200, await _read_limited(response, max_bytes)
    except aiohttp.ClientPayloadError as err:
        # The host closed before its Content-Length (or broke its chunking): it sent all it
        # will, and a retry gets the same truncated file. Permanent, like a corrupt one.
        raise BadInput("corrupt_audio", f"media body incomplete: {type(err).__name__}") from err
    except aiohttp.InvalidURL as err:
        raise BadInput("corrupt_audio", "media URL not fetchable") from err
    except (aiohttp.ClientError, TimeoutError) as err:
        raise MediaUnavailable(f"media download failed: {type(err).__name__}") from err
    raise BadInput("corrupt_audio", "too many redirects")


def _redirect_target(current: str, location: str) -> str:
    try:
        target = urljoin(current, location)
    except ValueError:  # a Location no URL parser accepts
        target = ""
    _check_media_url(target)
    return target


async def _read_limited(response: aiohttp.ClientResponse, max_bytes: int) -> Download:
    length = response.content_length
    if length is not None and length > max_bytes:
        raise BadInput("too_large", f"media of {length} bytes announced")
    data = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        data += chunk
        if len(data) > max_bytes:  # no (or a lying) Content-Length: stop reading here
            raise BadInput("too_large", f"media over {max_bytes} bytes")
    return Download(bytes(data), length)


# ---- step 2: decode ---------------------------------------------------------------------


async def decode_voice_note(download: Download, max_duration_s: float) -> AudioInput:
    """Any audio WhatsApp sends -> PCM16 24 kHz, off the event loop (it is CPU work)."""
    try:
        decoded = await asyncio.to_thread(
            decode_to_pcm24k,
            download.data,
            max_duration_s=max_duration_s,
            expected_length=download.content_length,
        )
    except AudioDecodeError as err:
        key = "too_long" if err.reason == "too_long" else "corrupt_audio"
        raise BadInput(key, f"audio {err.reason}: {err.message}") from err
    except Exception as err:  # a decoder surprise is still a file we cannot hear
        log.exception("decoding a voice note failed unexpectedly")
        raise BadInput("corrupt_audio", f"audio undecodable: {type(err).__name__}") from err
    return AudioInput(decoded.pcm, decoded.duration_ms)


# ---- step 4: what to send ---------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    kind: str  # "text" | "voice"
    body: str | None = None
    media_url: str | None = None


def reply_parts(reply: WhatsAppReply, public_base_url: str) -> list[Part]:
    """Text first, then each voice note alone (WhatsApp audio carries no caption)."""
    parts = [Part("text", body=chunk) for chunk in split_text(reply.text, TEXT_LIMIT)]
    parts += [
        Part("voice", media_url=media.voice_note_url(public_base_url, media_id))
        for media_id in reply.media_ids
    ]
    return parts


def split_text(text: str, limit: int) -> list[str]:
    """Cut a long text into messages at paragraph, sentence or word ends."""
    text = text.strip()
    chunks: list[str] = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n"), window.rfind(". "), window.rfind("? "), window.rfind("! "))
        if cut < limit // 2:
            cut = window.rfind(" ")
        cut = cut + 1 if cut >= limit // 2 else limit
        chunks.append(text[:cut].strip())
        text = text[cut:].strip()
    return [*chunks, text] if text else chunks


def _same_content(message: Any, part: Part) -> bool:
    """A Twilio message resource carrying this part (Twilio keeps no copy of a MediaUrl)."""
    if part.kind == "text":
        return message.body == part.body
    return not message.body and int(message.num_media or 0) > 0


def _retryable(status: int | None) -> bool:
    return status is None or status == 429 or status >= 500


# ---- the pipeline -----------------------------------------------------------------------


class WhatsAppChannel:
    """The channel's running parts: media downloads, warm sessions and the queue worker."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.http: aiohttp.ClientSession | None = None
        self.sessions: WarmSessions | None = None
        self.worker: InboundWorker | None = None
        self.intake: Intake | None = None
        self._sending: set[asyncio.Task[Any]] = set()
        self._stopped = False
        self.fixed_voices = FixedVoices(rt)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: runs after the store and clients are open, stops before they close."""
        settings = self.rt.settings
        self.http = aiohttp.ClientSession(timeout=DOWNLOAD_TIMEOUT)
        self.sessions = WarmSessions(self.rt, settings.whatsapp_session_idle_s)
        self.worker = InboundWorker(
            self.rt.store, self.process, concurrency=settings.whatsapp_concurrency
        )
        self.intake = await Intake.open(settings.database_url, self.wake)
        self.rt.holders.register(self)
        await self.worker.start()
        yield
        await self.stop()
        await self.http.close()

    async def stop(self) -> None:
        """Stop answering (once): a message cut off here is answered after the restart."""
        if self._stopped or not (self.intake and self.worker and self.sessions):
            return  # stopped already, or never started
        self._stopped = True
        await self.intake.close()
        await self.worker.stop()
        if self._sending:  # a message Twilio may already have: let its record land
            await asyncio.wait(self._sending, timeout=SEND_GRACE_S)
        await self.sessions.close_all()

    async def forget(self, person_id: int) -> None:
        """Erasure: the person's warm session closes (a reply being composed for them is
        dropped, see `process`), and sends already at Twilio finish recording first."""
        if self.sessions is not None:
            await self.sessions.forget(person_id)
        if self._sending:
            await asyncio.wait(self._sending, timeout=SEND_GRACE_S)

    def changed(self, person_id: int) -> None:
        """Nothing to push: a warm session catches up before each turn (whatsapp_turns)."""

    async def accept(self, arrival: Arrival) -> bool:
        """Store a webhook durably (before it is answered); False for a repeated MessageSid."""
        assert self.intake is not None, "the channel starts before the server accepts requests"
        return await self.intake.accept(arrival)

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    async def process(self, message: InboundMessage) -> None:
        """The worker's handler: answer one message, resuming whatever a failure cut short."""
        inbound = Inbound.from_message(message)
        store = self.rt.store
        with correlated(f"msg={inbound.message_sid}"):
            try:
                reply = await store.reply_for(inbound.message_sid)
                if reply is None:
                    reply = await self._within_limits(message, inbound)
                    self._still_here(inbound)
                    await store.save_reply(reply)
                    if reply.kind == "model":
                        self.rt.holders.changed(inbound.person_id)  # a live call hears of it
                    TURNS.labels("whatsapp", "user").inc()
                    TURNS.labels("whatsapp", "assistant").inc(reply.kind == "model")
                await self._send(inbound, reply)
            except (PersonErased, Erased) as gone:
                raise GiveUp(f"the person was erased meanwhile ({gone})") from None
        if message.received_at:
            received = datetime.fromisoformat(message.received_at)
            WHATSAPP_REPLY.observe((datetime.now(UTC) - received).total_seconds())

    def _still_here(self, inbound: Inbound) -> None:
        """Between steps: once the person is erased, nothing more of this message is kept
        or sent (ids are never reused, so the tombstone is theirs alone)."""
        if self.rt.holders.erased(inbound.person_id):
            raise PersonErased(f"person {inbound.person_id} was erased")

    async def _within_limits(self, message: InboundMessage, inbound: Inbound) -> WhatsAppReply:
        """The owner's limits (gateway.limits) before a model turn costs anything: over the
        daily budget, a polite text; no turn free, the message waits in the queue and the
        person is told once; else one turn answers it and the texts waiting behind it."""
        if classify(inbound) not in ("text", "audio"):  # a fixed reply costs no model
            return await self._compose(inbound, message.attempts)
        limits = self.rt.limits
        person = await self.rt.store.person_by_id(inbound.person_id)
        if person is None:
            raise GiveUp("the person no longer exists")
        if await limits.over_budget(self.rt, person, "whatsapp"):
            await self._merged(message, inbound)  # one polite answer for the whole burst
            return await self._fixed(inbound, "over_budget")
        wait = limits.take_turn(person.id)
        if wait > 0:
            WHATSAPP_LIMITED.labels("deferred").inc()
            if limits.first_wait(person.id):
                await self._tell_to_wait(inbound)
            raise Defer(wait, "turn limit reached")
        return await self._compose(await self._merged(message, inbound), message.attempts)

    async def _merged(self, message: InboundMessage, inbound: Inbound) -> Inbound:
        """A text with the texts that waited behind it (already merged ones first, on a
        resumed turn): one turn, one reply; their rows point at this message."""
        if classify(inbound) != "text":
            return inbound
        behind = await self.rt.store.waiting_behind(message)
        texts = list(takewhile(lambda m: classify(Inbound.from_message(m)) == "text", behind))
        fresh = [m.message_sid for m in texts if m.status == "pending"]
        if fresh:
            await self.rt.store.merge_into(inbound.message_sid, fresh)
            WHATSAPP_LIMITED.labels("merged").inc(len(fresh))
            log.info(
                "whatsapp %s: answers %d later message(s) too", inbound.message_sid, len(fresh)
            )
        bodies = [inbound.body.strip(), *(str(m.payload.get("Body", "")).strip() for m in texts)]
        return replace(inbound, body="\n".join(bodies))

    async def _tell_to_wait(self, inbound: Inbound) -> None:
        """Once per wait, recorded with the message so a restart does not say it twice."""
        if WAIT_NOTICE_PART in await self._parts_sent(inbound):
            return
        notice = Part("text", body=self.rt.persona.messages["rate_limited"])
        await self._send_part(inbound, WAIT_NOTICE_PART, notice)

    async def _compose(self, inbound: Inbound, attempts: int) -> WhatsAppReply:
        sid = inbound.message_sid
        try:
            turn = await self._turn_input(inbound)
            voice = await self._answer(inbound, turn)
        except (PersonErased, Erased, GiveUp):
            raise
        except BadInput as bad:
            log.info("whatsapp %s: %s; answering %s", sid, bad.detail, bad.key)
            return await self._fixed(inbound, bad.key)
        except Exception as err:  # transient (Realtime, media host) or a bug: retry, then apologise
            ERRORS.labels("whatsapp_compose").inc()
            if not isinstance(err, RealtimeUnavailable | MediaUnavailable):
                log.exception("whatsapp %s: unexpected error while composing the reply", sid)
            assert self.worker is not None
            if attempts < self.worker.max_attempts:
                raise RetryLater(str(err) or type(err).__name__) from err
            log.error("whatsapp %s: %s on the last attempt; apologising", sid, err)
            return await self._fixed(inbound, "processing_error")
        return await self._model_reply(inbound, voice)

    async def _turn_input(self, inbound: Inbound) -> TurnInput:
        kind = classify(inbound)
        if kind == "text":
            return TextInput(inbound.body.strip())
        if kind == "empty":
            raise BadInput("empty_message", "empty message")
        if kind == "unsupported":
            what = inbound.media_type or inbound.message_type or "unknown"
            raise BadInput("unsupported_media", f"unsupported message ({what})")
        assert self.http is not None and inbound.media_url is not None
        settings = self.rt.settings
        download = await download_media(
            self.http,
            inbound.media_url,
            self._media_auth(),
            settings.max_media_bytes,
            settings.media_read_deadline_s,
        )
        return await decode_voice_note(download, settings.max_voice_note_s)

    def _media_auth(self) -> MediaAuth:
        rt = self.rt
        return MediaAuth(rt.twilio_api_base_url, rt.twilio_account_sid, rt.twilio_auth_token)

    async def _answer(self, inbound: Inbound, turn: TurnInput) -> VoiceReply:
        person = await self.rt.store.person_by_id(inbound.person_id)
        if person is None:  # erased (data deletion) between accept and now
            raise GiveUp("the person no longer exists")
        assert self.sessions is not None
        voice = await self.sessions.reply(person, turn, inbound.message_sid, inbound.recipient)
        await note_erasure_request(self.rt.store, person, "whatsapp", voice.user_text)
        return voice

    async def _model_reply(self, inbound: Inbound, voice: VoiceReply) -> WhatsAppReply:
        ttl = self.rt.settings.media_ttl_s
        self._still_here(inbound)
        media_ids = [
            await media.publish_voice_note(
                self.rt.store, note, person_id=inbound.person_id, ttl_s=ttl
            )
            for note in voice.notes
        ]
        return WhatsAppReply(
            message_sid=inbound.message_sid,
            person_id=inbound.person_id,
            conversation_id=voice.conversation_id,
            kind="model",
            text=voice.text,
            user_text=voice.user_text,
            user_audio_ms=voice.user_audio_ms,
            audio_ms=voice.audio_ms,
            media_ids=media_ids,
            response_id=voice.response_id,
        )

    async def _fixed(self, inbound: Inbound, key: str) -> WhatsAppReply:
        """A fixed message, with its voice note like every reply (text alone if unreadable)."""
        notes = await self.fixed_voices.notes(key)
        media_ids = [
            await media.publish_voice_note(
                self.rt.store, note, person_id=inbound.person_id, ttl_s=self.rt.settings.media_ttl_s
            )
            for note in notes
        ]
        return WhatsAppReply(
            message_sid=inbound.message_sid,
            person_id=inbound.person_id,
            conversation_id=None,
            kind="fixed",
            text=self.rt.persona.messages[key],
            media_ids=media_ids,
        )

    # step 5: send
    async def _send(self, inbound: Inbound, reply: WhatsAppReply) -> None:
        parts = reply_parts(reply, self.rt.settings.public_base_url)
        sent = await self._parts_sent(inbound)
        for index, part in enumerate(parts):
            if index not in sent:  # a resumed message skips what already went out
                self._still_here(inbound)
                await self._send_part(inbound, index, part)

    async def _parts_sent(self, inbound: Inbound) -> set[int]:
        """Parts whose outcome is recorded; one only begun may or may not be at Twilio."""
        outbound = await self.rt.store.outbound_for(inbound.message_sid)
        return {o.part for o in outbound if o.status != CREATING}

    async def _send_part(self, inbound: Inbound, index: int, part: Part) -> None:
        sid = inbound.message_sid
        for delay in (*SEND_RETRY_DELAYS_S, None):
            try:
                await self._send_shielded(inbound, index, part)
                return
            except (TwilioRestException, TwilioServiceException) as err:
                status, code = getattr(err, "status", None), getattr(err, "code", None)
                if not _retryable(status):
                    await self._refused(inbound, index, part, status, code, err)
                if delay is None:
                    raise RetryLater(f"Twilio answered {status} ({code})") from err
                log.warning("whatsapp %s: Twilio %s (%s); retrying", sid, status, code)
            except (aiohttp.ClientError, TimeoutError) as err:
                if delay is None:
                    raise RetryLater(f"Twilio unreachable: {type(err).__name__}") from err
                log.warning("whatsapp %s: Twilio unreachable (%s); retrying", sid, err)
            await asyncio.sleep(delay)

    async def _send_shielded(self, inbound: Inbound, index: int, part: Part) -> None:
        """Create and record as one piece that shutdown cannot cut in half: once Twilio may
        have the message, the request is finished and its SID kept (see `lifecycle`)."""
        task = asyncio.ensure_future(self._create_and_record(inbound, index, part))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        await asyncio.shield(task)

    async def _create_and_record(self, inbound: Inbound, index: int, part: Part) -> None:
        sid = inbound.message_sid
        begun = await self.rt.store.begin_outbound(sid, index, part.kind)
        created = await self._created_before(inbound, part, begun) if begun else None
        if created is not None:
            log.warning(
                "whatsapp %s: %s part %d was already at Twilio as %s (its answer was lost); "
                "not sent again",
                sid,
                part.kind,
                index,
                created.sid,
            )
        else:
            try:
                created = await self._create_message(inbound, part)
            except (TwilioRestException, TwilioServiceException):
                # An answer, if an error: Twilio created nothing, so nothing to look for.
                await self.rt.store.forget_outbound(sid, index)
                raise
        try:
            await self.rt.store.record_outbound(
                sid, index, part.kind, message_sid=created.sid, status=str(created.status)
            )
        except Erased:  # erased while Twilio took it: the record goes with everything else
            log.info("whatsapp %s: sent as %s, not recorded: person erased", sid, created.sid)
            return
        log.info("whatsapp %s: %s part %d sent as %s", sid, part.kind, index, created.sid)

    async def _created_before(self, inbound: Inbound, part: Part, begun: str) -> Any | None:
        """The message an earlier attempt at this part created, if Twilio has one: from us to
        this person, created since that attempt began, with the part's content, and not
        recorded as another part. Twilio takes no idempotency key on a create, so after a
        lost answer or a dead instance this read is what keeps a part from going out twice."""
        since = datetime.fromisoformat(begun) - CLOCK_SKEW
        recent = await self.rt.twilio.messages.list_async(
            to=inbound.sender, from_=inbound.recipient, limit=LOOKBACK_MESSAGES
        )
        for message in reversed(recent):  # newest first from Twilio: the earliest match wins
            if message.date_created is not None and message.date_created < since:
                continue
            if _same_content(message, part) and not await self.rt.store.outbound_recorded(
                message.sid
            ):
                return message
        return None

    async def _create_message(self, inbound: Inbound, part: Part) -> Any:
        content: dict[str, Any] = (
            {"body": part.body} if part.kind == "text" else {"media_url": [part.media_url]}
        )
        return await self.rt.twilio.messages.create_async(
            to=inbound.sender,
            from_=inbound.recipient,
            status_callback=self.rt.settings.public_base_url + STATUS_PATH,
            **content,
        )

    async def _refused(
        self,
        inbound: Inbound,
        index: int,
        part: Part,
        status: int | None,
        code: int | None,
        err: Exception,
    ) -> None:
        """A 4xx from Twilio: recorded, never retried (63016: outside the 24-hour window)."""
        message = getattr(err, "msg", None) or getattr(err, "detail", None) or ""
        await self.rt.store.record_outbound(
            inbound.message_sid,
            index,
            part.kind,
            message_sid=None,
            status="failed",
            error_code=code,
            error_message=str(message)[:500],
        )
        if code == OUTSIDE_WINDOW:
            raise GiveUp("63016: outside the 24-hour window; only a template can reach them")
        raise GiveUp(f"Twilio refused the {part.kind} message: HTTP {status}, code {code}")


# ---- HTTP handlers ----------------------------------------------------------------------

WHATSAPP = web.AppKey("whatsapp", WhatsAppChannel)


async def webhook(request: web.Request) -> web.Response:
    """Signed form POST from Twilio: stored durably, then answered with an empty TwiML."""
    started = time.perf_counter()
    rt = request.app[RUNTIME]
    if not await rt.signatures.form_ok(request):
        return signature_refused(request, "whatsapp")
    form = await request.post()
    try:  # the signature holds for a re-split form too: the fields must be Twilio's
        sid = check_whatsapp_message(form, rt.twilio_account_sid)
    except BadFields as err:
        return _bad_fields("whatsapp", err)
    try:
        e164 = normalize_number(str(form.get("From", "")))
    except ValueError:
        log.warning("whatsapp %s: sender is not a phone number; ignored", sid)
        return web.Response(status=400, text="bad From")
    payload = {key: str(value) for key, value in form.items()}
    arrival = Arrival(e164, _profile_name(form), sid, payload)
    try:
        fresh = await request.app[WHATSAPP].accept(arrival)
    except Exception:  # logged by the intake; Twilio logs 11200 and may try its fallback URL
        return web.Response(status=500, text="not stored")
    with correlated(f"msg={sid}"):
        if fresh:
            log.info("whatsapp %s: accepted from %s", sid, mask_number(e164))
        else:
            log.info("whatsapp %s: duplicate delivery, already accepted", sid)
    WHATSAPP_WEBHOOK.observe(time.perf_counter() - started)
    return web.Response(text=EMPTY_TWIML, content_type="text/xml")


def _bad_fields(kind: str, err: BadFields) -> web.Response:
    """Refused before any store write or cost. Logged by field name only: the value may be
    a phone number, or whatever a forger chose."""
    log.warning("%s webhook refused: %s", kind, err)
    ERRORS.labels(f"{kind}_bad_fields").inc()
    return web.Response(status=400, text=f"bad {err.field}")


def _profile_name(form: Any) -> str | None:
    name = " ".join(str(form.get("ProfileName", "")).split())
    return name[:100] or None


async def status_callback(request: web.Request) -> web.Response:
    """Signed delivery status of a message we sent (sent, delivered, read, failed...)."""
    rt = request.app[RUNTIME]
    if not await rt.signatures.form_ok(request):
        return signature_refused(request, "whatsapp-status")
    form = await request.post()
    try:
        sid = check_message_status(form, rt.twilio_account_sid)
    except BadFields as err:
        return _bad_fields("whatsapp_status", err)
    status = str(form.get("MessageStatus", ""))
    if not status:
        return web.Response(status=400, text="missing MessageStatus")
    code = _error_code(form)
    message = str(form.get("ErrorMessage", ""))[:500] or None
    await rt.store.update_outbound_status(sid, status, code, message)
    if code is not None:
        log.warning("whatsapp outbound %s: %s, error %d", sid, status, code)
    else:
        log.info("whatsapp outbound %s: %s", sid, status)
    return web.Response(status=204)


def _error_code(form: Any) -> int | None:
    raw = str(form.get("ErrorCode", "")).strip()
    return int(raw) if raw.isdigit() else None


def setup(app: web.Application) -> None:
    channel = WhatsAppChannel(app[RUNTIME])
    app[WHATSAPP] = channel
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_post(STATUS_PATH, status_callback)
    media.setup(app)
    app.cleanup_ctx.append(channel.lifecycle)
