"""WhatsApp end to end over loopback: the gateway on a real port, the Twilio simulator (REST,
media host, CDN, signed callbacks) and the Realtime simulator, which validates every event the
gateway sends against the openai SDK's types. Nothing in the gateway is patched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import av
import numpy as np
import pytest

from gateway.settings import Settings, SettingsError
from gateway.store import Store
from gateway.transcode import decode_to_pcm24k, encode_ogg_opus
from gateway.whatsapp import EMPTY_TWIML, SEND_RETRY_DELAYS_S, split_text
from gateway.whatsapp_turns import MAX_NOTE_MS, NoteEncoder, ReplyCollector
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator
from simulators.speech import speech_pcm24k
from simulators.twilio import SentMessage, TwilioSimulator
from simulators.whatsapp_sender import WhatsAppSender, new_sid
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, GatewayFactory, RunningGateway
from tests.store_helpers import connect, inbound_record, open_db, wait_settled
from tests.test_call_faults import eventually

pytestmark = pytest.mark.both_stores

USER = "+5516999990001"
USER_WA = f"whatsapp:{USER}"
OUR_WA = "whatsapp:+14155238886"
REPLY = "Oi! Aqui é o Endrigo. Recebi sua mensagem e já te respondo com calma."
VOICE_NOTE_LIMIT = 512 * 1024
WAIT_S = 10.0  # a bound against hangs, never a speed claim


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=30, speed=20.0, reply_text=REPLY)


@dataclass
class WhatsAppHarness:
    gateway: RunningGateway
    sender: WhatsAppSender
    twilio: TwilioSimulator
    realtime: RealtimeSimulator

    @property
    def store(self) -> Store:
        return self.gateway.runtime.store

    async def settled(self, message_sid: str) -> str:
        async with asyncio.timeout(WAIT_S):
            return await wait_settled(self.store, message_sid)

    async def replies(self, n: int) -> list[SentMessage]:
        return await self.twilio.wait_for_messages(n, timeout=WAIT_S, settled=True)

    def persona_message(self, key: str) -> str:
        return self.gateway.runtime.persona.messages[key]


def only_reading_sessions(sessions: list, persona) -> bool:
    """The model never answered: any of these sessions only read a fixed message aloud."""
    reading = persona.tools["results"]["read_aloud"]
    for session in sessions:
        update = next(t.event for t in session.received if t.event["type"] == "session.update")
        if update["session"].get("instructions") != reading:
            return False
    return True


async def fixed_reply(
    twilio_sim: TwilioSimulator,
    realtime_sim: RealtimeSimulator,
    persona,
    key: str,
    timeout: float = WAIT_S,  # noqa: ASYNC109 - a bound against hangs
) -> list[SentMessage]:
    """A fixed message arrives as every reply does: its text, then its voice note."""
    text, voice = await twilio_sim.wait_for_messages(2, timeout=timeout, settled=True)
    assert text.body == persona.messages[key] and text.media_urls == []
    assert voice.body == "" and len(voice.media_urls) == 1
    assert len(twilio_sim.messages) == 2
    assert only_reading_sessions(realtime_sim.sessions, persona)
    return [text, voice]


@contextlib.asynccontextmanager
async def harness_for(
    gateway: RunningGateway, twilio_sim: TwilioSimulator, realtime_sim: RealtimeSimulator
) -> AsyncIterator[WhatsAppHarness]:
    sender = WhatsAppSender(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=USER)
    yield WhatsAppHarness(gateway, sender, twilio_sim, realtime_sim)
    await sender.close()
    # Every event the gateway sent was valid for the real API (the simulator checks each one).
    assert [s.errors for s in realtime_sim.sessions if s.errors] == []


@pytest.fixture
async def wa(gateway, twilio_sim, realtime_sim) -> AsyncIterator[WhatsAppHarness]:
    async with harness_for(gateway, twilio_sim, realtime_sim) as harness:
        yield harness


# ---- helpers ----------------------------------------------------------------------------


def ogg_info(data: bytes) -> tuple[str, int, str]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return stream.codec_context.codec.name, stream.codec_context.channels, container.format.name


def similarity(a: bytes, b: bytes, max_lag: int = 960) -> float:
    """Peak normalised cross-correlation of two PCM16 signals within +-max_lag samples."""
    x = np.frombuffer(a, dtype="<i2").astype(np.float64)
    y = np.frombuffer(b, dtype="<i2").astype(np.float64)
    n = min(len(x), len(y)) - max_lag
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 4):
        xs = x[max(0, lag) : max(0, lag) + n]
        ys = y[max(0, -lag) : max(0, -lag) + n]
        best = max(best, float(np.dot(xs, ys) / (np.linalg.norm(xs) * np.linalg.norm(ys))))
    return best


def assert_is_the_reply_audio(note: bytes, generated_pcm: bytes) -> None:
    """A playable WhatsApp voice note carrying exactly the audio the model generated."""
    assert len(note) <= VOICE_NOTE_LIMIT
    assert ogg_info(note) == ("opus", 1, "ogg")
    decoded = decode_to_pcm24k(note).pcm
    assert abs(len(decoded) - len(generated_pcm)) <= 20 * 48  # within one 20 ms Opus frame
    assert similarity(decoded, generated_pcm) > 0.9


def assert_no_credentials_at_the_cdn(twilio: TwilioSimulator) -> None:
    assert twilio.cdn_requests
    for request in twilio.cdn_requests:
        assert "authorization" not in {name.lower() for name in request.headers}


def voice_note_of(message: SentMessage) -> bytes:
    [fetch] = message.media
    assert fetch.status == 200 and fetch.content_type == "audio/ogg"
    return fetch.data


async def http_get(url: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


def received_types(realtime_sim: RealtimeSimulator, index: int = 0) -> list[str]:
    return [t.event["type"] for t in realtime_sim.sessions[index].received]


# ---- text and voice notes in, text + voice note out -------------------------------------


async def test_text_in_gets_the_text_then_a_voice_note_of_the_same_reply(wa):
    result = await wa.sender.send_text("Olá, quanto custa a consultoria?")
    assert (result.status, result.body) == (200, EMPTY_TWIML)
    assert result.content_type.split(";")[0] == "text/xml"

    text, voice = await wa.replies(2)
    assert await wa.settled(result.message_sid) == "done"
    assert (text.to, text.from_, text.body, text.media_urls) == (USER_WA, OUR_WA, REPLY, [])
    assert voice.body == "" and len(voice.media_urls) == 1
    url = voice.media_urls[0]
    assert url.startswith(f"{wa.gateway.url}/static/audio/") and url.endswith(".ogg")
    assert (text.status, voice.status) == ("delivered", "delivered")  # no 63019 from Twilio

    [session] = wa.realtime.sessions
    [response] = session.responses
    assert_is_the_reply_audio(voice_note_of(voice), response.audio)
    assert received_types(wa.realtime) == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]
    update, item, create = (t.event for t in session.received)
    assert update["session"]["audio"]["input"]["turn_detection"] is None
    assert update["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert update["session"]["audio"]["output"]["voice"] == "cedar"  # the same voice as calls
    assert item["item"]["content"] == [
        {"type": "input_text", "text": "Olá, quanto custa a consultoria?"}
    ]
    assert create["response"]["output_modalities"] == ["audio"]


async def test_text_reply_is_remembered_and_delivery_statuses_are_recorded(wa):
    result = await wa.sender.send_text("Tenho uma imobiliária em Ribeirão Preto")
    await wa.replies(2)
    await wa.settled(result.message_sid)

    person = await wa.store.person_by_number(USER)
    assert person.name == "Cliente Teste"
    turns = await wa.store.recent_turns(person.id)
    assert [(t.channel, t.role, t.text) for t in turns] == [
        ("whatsapp", "user", "Tenho uma imobiliária em Ribeirão Preto"),
        ("whatsapp", "assistant", REPLY),
    ]
    [response] = wa.realtime.sessions[0].responses
    assert turns[1].audio_ms == pytest.approx(response.audio_ms, abs=1)
    outbound = await wa.store.outbound_for(result.message_sid)
    assert [(o.kind, o.status, o.error_code) for o in outbound] == [
        ("text", "delivered", None),
        ("voice", "delivered", None),
    ]
    assert [o.message_sid for o in outbound] == [m.sid for m in wa.twilio.messages]


async def test_voice_note_in_reaches_the_model_as_pcm24k_and_is_answered_alike(wa):
    spoken = speech_pcm24k(2500, seed=5)
    note = encode_ogg_opus(spoken)
    sid = new_sid("MM")
    media_url = wa.twilio.add_media(note, "audio/ogg", message_sid=sid)
    result = await wa.sender.send_media(media_url, "audio/ogg", message_sid=sid)
    assert result.status == 200

    text, voice = await wa.replies(2)
    [session] = wa.realtime.sessions
    [committed] = session.committed
    assert committed.audio_format == "audio/pcm"
    assert bytes(committed.audio) == decode_to_pcm24k(note).pcm  # the whole note, untouched
    assert similarity(bytes(committed.audio), spoken) > 0.9
    types = received_types(wa.realtime)
    appends = [t.event for t in session.received if t.event["type"] == "input_audio_buffer.append"]
    assert types == [
        "session.update",
        *["input_audio_buffer.append"] * len(appends),
        "input_audio_buffer.commit",
        "response.create",
    ]
    assert len(appends) == math.ceil(len(committed.audio) / 48000)  # 1 s chunks
    assert max(len(base64.b64decode(a["audio"])) for a in appends) <= 48000

    [response] = session.responses
    assert text.body == REPLY and voice.body == ""
    assert_is_the_reply_audio(voice_note_of(voice), response.audio)

    await wa.settled(sid)
    person = await wa.store.person_by_number(USER)
    user_turn, reply_turn = await wa.store.recent_turns(person.id)
    assert user_turn.text == "(fala do cliente)"  # the simulator's input transcript
    assert user_turn.audio_ms == pytest.approx(2500, abs=25)
    assert reply_turn.text == REPLY and reply_turn.audio_ms > 0


async def test_media_credentials_go_to_the_twilio_api_only_never_to_the_cdn(wa):
    sid = new_sid("MM")
    url = wa.twilio.add_media(encode_ogg_opus(speech_pcm24k(800)), "audio/ogg", message_sid=sid)
    await wa.sender.send_media(url, "audio/ogg", message_sid=sid)
    await wa.replies(2)
    [hosted] = wa.twilio.media.values()
    assert [r["headers"].get("Authorization") for r in hosted.requests] == ["<redacted>"]
    assert wa.twilio.cdn_requests
    assert_no_credentials_at_the_cdn(wa.twilio)


async def test_a_forged_media_url_never_gets_the_credentials(wa):
    sid = new_sid("MM")
    note = encode_ogg_opus(speech_pcm24k(800))
    real = wa.twilio.add_media(note, "audio/ogg", message_sid=sid)
    [hosted] = wa.twilio.media.values()
    # Same host and shape, another account: a forged URL must not receive our Basic auth.
    forged = real.replace(ACCOUNT_SID, "AC" + "9" * 32)
    result = await wa.sender.send_media(forged, "audio/ogg", message_sid=sid)
    [apology] = await wa.replies(1)
    assert await wa.settled(result.message_sid) == "done"
    assert [r["headers"].get("Authorization") for r in hosted.requests] == [None]
    assert apology.body == wa.persona_message("processing_error")
    # Straight at the CDN (another origin): fetched without credentials, and answered.
    direct = f"{wa.twilio.cdn_base_url}/{hosted.cdn_token}"
    second = await wa.sender.send_media(direct, "audio/ogg")
    await wa.replies(3)
    assert await wa.settled(second.message_sid) == "done"
    assert_no_credentials_at_the_cdn(wa.twilio)


async def test_a_brief_404_on_the_media_is_retried(wa):
    sid = new_sid("MM")
    note = encode_ogg_opus(speech_pcm24k(600))
    url = wa.twilio.add_media(note, "audio/ogg", message_sid=sid, not_found_first=1)
    await wa.sender.send_media(url, "audio/ogg", message_sid=sid)
    text, _voice = await wa.replies(2)
    assert text.body == REPLY
    [hosted] = wa.twilio.media.values()
    assert len(hosted.requests) == 2


# ---- idempotency, signatures ------------------------------------------------------------


async def test_a_repeated_message_sid_is_answered_once(wa):
    sid = new_sid("SM")
    first = await wa.sender.send_text("Oi, tudo bem?", message_sid=sid)
    again = await wa.sender.send_text("Oi, tudo bem?", message_sid=sid)
    assert (first.status, first.body) == (again.status, again.body) == (200, EMPTY_TWIML)
    await wa.replies(2)
    # A later message of the same person gets its own answer (one sent while the first is
    # still being answered would be answered with it: test_limits).
    later = await wa.sender.send_text("E quanto custa?")
    await wa.replies(4)
    assert await wa.settled(later.message_sid) == "done"
    assert len(wa.twilio.messages) == 4
    record = await inbound_record(wa.store, sid)
    assert (record.status, record.attempts) == ("done", 1)


async def test_a_forged_signature_gets_403_and_nothing_is_stored_or_sent(wa):
    forged = await wa.sender.send_text("Oi", forge=True)
    assert forged.status == 403
    assert await inbound_record(wa.store, forged.message_sid) is None
    assert await wa.store.person_by_number(USER) is None
    genuine = await wa.sender.send_text("Oi de verdade")
    await wa.replies(2)
    assert await wa.settled(genuine.message_sid) == "done"
    assert len(wa.twilio.messages) == 2 and len(wa.realtime.sessions) == 1


async def test_status_callbacks_must_be_signed(wa):
    form = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered"}
    url = wa.gateway.url + "/webhook/whatsapp/status"
    headers = {"X-Twilio-Signature": "bad"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=form, headers=headers) as response,
    ):
        assert response.status == 403
    assert await wa.store.outbound_for("SM" + "0" * 32) == []


# ---- bad input: a short polite reply, never the model, never a crash --------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(600)


@pytest.mark.parametrize(
    ("data", "content_type", "key"),
    [
        (b"OggS" + bytes(range(256)) * 40, "audio/ogg", "corrupt_audio"),
        (PNG, "image/jpeg", "unsupported_media"),
        (b"%PDF-1.4" + bytes(500), "application/pdf", "unsupported_media"),
        (bytes(20 * 1024 * 1024), "audio/ogg", "too_large"),
    ],
    ids=["corrupt-audio", "image", "document", "20-MB-file"],
)
async def test_bad_media_gets_a_polite_fixed_reply(wa, data, content_type, key):
    sid = new_sid("MM")
    url = wa.twilio.add_media(data, content_type, message_sid=sid)
    await wa.sender.send_media(url, content_type, message_sid=sid)
    await fixed_reply(wa.twilio, wa.realtime, wa.gateway.runtime.persona, key)
    assert await wa.settled(sid) == "done"
    if key == "unsupported_media":  # not even downloaded
        assert [h.requests for h in wa.twilio.media.values()] == [[]]


async def test_an_empty_message_is_acknowledged_without_the_model(wa):
    result = await wa.sender.send_text("   ")
    await fixed_reply(wa.twilio, wa.realtime, wa.gateway.runtime.persona, "empty_message")
    assert await wa.settled(result.message_sid) == "done"


async def test_a_voice_note_over_the_duration_limit_is_refused_politely(
    start_gateway, live_env, twilio_sim, realtime_sim
):
    gateway = await start_gateway({**live_env, "MAX_VOICE_NOTE_S": "1"})
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        sid = new_sid("MM")
        url = twilio_sim.add_media(encode_ogg_opus(speech_pcm24k(2500)), "audio/ogg", sid)
        await wa.sender.send_media(url, "audio/ogg", message_sid=sid)
        await fixed_reply(twilio_sim, realtime_sim, gateway.runtime.persona, "too_long")


# ---- Twilio failures --------------------------------------------------------------------


async def test_twilio_500_and_429_are_retried_until_sent(wa):
    wa.twilio.fail_next(500)
    wa.twilio.fail_next(429)
    result = await wa.sender.send_text("Oi")
    await wa.replies(2)
    assert await wa.settled(result.message_sid) == "done"
    assert [r.status for r in wa.twilio.rest_requests] == [500, 429, 201, 201]
    assert [m.body for m in wa.twilio.messages] == [REPLY, ""]


async def test_outside_the_24_hour_window_is_recorded_and_not_retried(wa):
    wa.twilio.close_window(USER_WA, mode="sync")
    result = await wa.sender.send_text("Oi")
    assert await wa.settled(result.message_sid) == "failed"
    assert [(r.status, r.code) for r in wa.twilio.rest_requests] == [(400, 63016)]
    [outbound] = await wa.store.outbound_for(result.message_sid)
    assert (outbound.kind, outbound.status, outbound.error_code) == ("text", "failed", 63016)
    record = await inbound_record(wa.store, result.message_sid)
    assert record.status == "failed" and record.attempts == 1 and "63016" in record.error


async def test_63016_reported_by_status_callback_is_recorded(wa):
    wa.twilio.close_window(USER_WA, mode="async")
    result = await wa.sender.send_text("Oi")
    messages = await wa.replies(2)
    assert await wa.settled(result.message_sid) == "done"
    assert [m.error_code for m in messages] == [63016, 63016]
    outbound = await wa.store.outbound_for(result.message_sid)
    assert [(o.status, o.error_code) for o in outbound] == [("failed", 63016)] * 2
    assert len(wa.twilio.rest_requests) == 2  # nothing resent


async def test_twilio_down_past_the_inline_retries_requeues_without_asking_the_model_again(wa):
    wa.twilio.fail_next(503, count=len(SEND_RETRY_DELAYS_S) + 1)  # every in-line try fails
    result = await wa.sender.send_text("Oi")
    async with asyncio.timeout(WAIT_S):
        assert await wait_settled(wa.store, result.message_sid, ("retry",)) == "retry"
    assert await wa.settled(result.message_sid) == "done"  # the queue's backoff, then sent
    await wa.replies(2)
    tries = len(SEND_RETRY_DELAYS_S) + 1
    assert [r.status for r in wa.twilio.rest_requests] == [503] * tries + [201, 201]
    [session] = wa.realtime.sessions
    assert len(session.responses) == 1  # the saved reply was resent, not recomposed
    record = await inbound_record(wa.store, result.message_sid)
    assert (record.status, record.attempts) == ("done", 2)


async def test_a_part_twilio_took_but_whose_answer_was_lost_is_not_sent_twice(wa):
    wa.twilio.lose_next_answers(1)  # the text goes out; the gateway reads a dropped connection
    result = await wa.sender.send_text("Oi")
    assert await wa.settled(result.message_sid) == "done"
    text, voice = wa.twilio.messages  # the person gets the reply once
    assert (text.body, voice.body) == (REPLY, "") and len(voice.media_urls) == 1
    # Twilio was asked before sending again, and said the text was there.
    assert [(r.method, r.status) for r in wa.twilio.rest_requests] == [
        ("POST", 201),
        ("GET", 200),
        ("POST", 201),
    ]
    outbound = await wa.store.outbound_for(result.message_sid)
    assert [(o.part, o.message_sid) for o in outbound] == [(0, text.sid), (1, voice.sid)]


async def test_a_message_waiting_for_its_retry_is_not_overtaken_by_the_next_one(wa):
    wa.twilio.fail_next(503, count=len(SEND_RETRY_DELAYS_S) + 1)  # the first reply bounces
    first = await wa.sender.send_text("Primeira pergunta")
    async with asyncio.timeout(WAIT_S):
        assert await wait_settled(wa.store, first.message_sid, ("retry",)) == "retry"
    second = await wa.sender.send_text("Segunda pergunta")  # while the first waits
    assert await wa.settled(second.message_sid) == "done"
    assert await wa.settled(first.message_sid) == "done"
    sent = await wa.replies(4)
    first_sids = {o.message_sid for o in await wa.store.outbound_for(first.message_sid)}
    second_sids = {o.message_sid for o in await wa.store.outbound_for(second.message_sid)}
    # The person gets the answers in the order they asked: both of the first's, then the second's.
    assert [m.sid in first_sids for m in sent] == [True, True, False, False]
    assert {m.sid for m in sent[2:]} == second_sids


# ---- crash and restart ------------------------------------------------------------------


async def test_a_message_accepted_before_a_crash_is_answered_once_after_restart(
    start_gateway: GatewayFactory, live_env, twilio_sim, realtime_sim, sim_config, tmp_path
):
    sim_config.first_audio_latency_ms = 60_000  # the model is slow: the gateway dies first
    first = await start_gateway(live_env)
    sender = WhatsAppSender(first.url, first.url, AUTH_TOKEN, ACCOUNT_SID, from_number=USER)
    accepted = await sender.send_text("Oi, você está aí?")
    await sender.close()
    assert accepted.status == 200
    session = await realtime_sim.wait_for_session(timeout=WAIT_S)
    await session.wait_event("response.created", timeout=WAIT_S)
    await first.stop()  # killed between accept and reply

    db = open_db(first)
    [(status,)] = db.execute(
        "SELECT status FROM inbound_messages WHERE message_sid = ?", (accepted.message_sid,)
    )
    db.close()
    assert status == "processing" and twilio_sim.messages == []

    sim_config.first_audio_latency_ms = 30
    second = await start_gateway(live_env)
    async with harness_for(second, twilio_sim, realtime_sim) as wa:
        assert await wa.settled(accepted.message_sid) == "done"
        text, voice = await wa.replies(2)
        assert text.body == REPLY and voice.media_urls[0].startswith(second.url)
        assert len(twilio_sim.messages) == 2
        record = await inbound_record(wa.store, accepted.message_sid)
        assert (record.status, record.attempts) == ("done", 2)


# ---- the warm session -------------------------------------------------------------------


async def test_consecutive_messages_share_one_warm_session(wa):
    first = await wa.sender.send_text("Meu nome é Ana")
    await wa.replies(2)
    await wa.settled(first.message_sid)
    sid = new_sid("MM")
    url = wa.twilio.add_media(encode_ogg_opus(speech_pcm24k(700)), "audio/ogg", message_sid=sid)
    await wa.sender.send_media(url, "audio/ogg", message_sid=sid)
    await wa.replies(4)
    [session] = wa.realtime.sessions  # no second connect
    assert len(session.responses) == 2
    creates = [t.event for t in session.received if t.event["type"] == "response.create"]
    # The voice note's channel differs from the session's (text): its own instructions.
    assert "instructions" in creates[1]["response"]
    assert "áudio" in creates[1]["response"]["instructions"]
    assert [i.role for i in session.conversation] == ["user", "assistant"] * 2


async def test_a_dropped_session_is_reopened_with_memory(wa):
    first = await wa.sender.send_text("Meu nome é Ana e vendo casas")
    await wa.replies(2)
    await wa.settled(first.message_sid)
    await wa.realtime.sessions[0].drop(1011, "Internal server error")
    second = await wa.sender.send_text("Você lembra de mim?")
    await wa.replies(4)
    assert await wa.settled(second.message_sid) == "done"
    assert len(wa.realtime.sessions) == 2
    update = wa.realtime.sessions[1].received[0].event
    assert update["type"] == "session.update"
    assert "Meu nome é Ana e vendo casas" in update["session"]["instructions"]


async def test_an_idle_session_is_closed_and_its_conversation_ended(
    start_gateway, live_env, twilio_sim, realtime_sim
):
    gateway = await start_gateway({**live_env, "WHATSAPP_SESSION_IDLE_S": "1"})
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        result = await wa.sender.send_text("Oi")
        await wa.replies(2)
        await wa.settled(result.message_sid)
        [session] = realtime_sim.sessions
        await session.wait_for(lambda: realtime_sim.sessions[0].closed, timeout=WAIT_S)
        person = await wa.store.person_by_number(USER)

        def ended() -> list[tuple[str | None]]:
            with connect(gateway) as db:
                sql = "SELECT ended_at FROM conversations WHERE person_id = ?"
                return db.execute(sql, (person.id,)).fetchall()

        # Ending the conversation (written just after the close) hands it to the summarizer.
        await eventually(lambda: ended()[0][0] is not None, WAIT_S)
        assert len(ended()) == 1


# ---- published voice notes --------------------------------------------------------------


async def test_voice_notes_are_served_from_the_store_until_they_expire(wa):
    store = wa.store
    note = encode_ogg_opus(speech_pcm24k(300))
    await store.put_media("a" * 32, note, "audio/ogg", person_id=None, ttl_s=600)
    await store.put_media("b" * 32, note, "audio/ogg", person_id=None, ttl_s=-1)
    base = f"{wa.gateway.url}/static/audio"
    assert await http_get(f"{base}/{'a' * 32}.ogg") == (200, "audio/ogg", note)
    assert (await http_get(f"{base}/{'b' * 32}.ogg"))[0] == 404  # expired
    assert (await http_get(f"{base}/{'c' * 32}.ogg"))[0] == 404  # unknown
    assert (await http_get(f"{base}/..%2f..%2fetc.ogg"))[0] == 404
    assert await store.delete_expired_media() == 1


# ---- pure helpers and settings ----------------------------------------------------------


def test_long_replies_are_split_at_sentence_ends_under_the_limit():
    text = " ".join(f"Frase número {i} sobre imóveis." for i in range(120))
    chunks = split_text(text, 1600)
    assert len(chunks) > 1 and all(len(c) <= 1600 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == text
    assert split_text("curto", 1600) == ["curto"] and split_text("  ", 1600) == []


def test_long_replies_become_several_voice_notes_each_playable():
    encoder = NoteEncoder(max_note_ms=1000)
    pcm = speech_pcm24k(2500)
    for start in range(0, len(pcm), 4801):  # ragged deltas, odd sizes included
        encoder.push(pcm[start : start + 4801])
    notes = encoder.finish()
    assert encoder.duration_ms == 2500
    assert [round(len(decode_to_pcm24k(n).pcm) / 48) for n in notes] == [1000, 1000, 500]
    # The default split keeps a note under WhatsApp's 512 KB: 30 s at the voice bitrate x 5.
    thirty = NoteEncoder()
    thirty.push(speech_pcm24k(30_000))
    [note] = thirty.finish()
    assert len(note) * MAX_NOTE_MS / 30_000 < VOICE_NOTE_LIMIT * 0.95


def test_the_collector_keeps_only_its_own_response():
    audio: list[bytes] = []
    collector = ReplyCollector(audio.append, wants_user_transcript=True)
    delta = base64.b64encode(b"\x01\x00" * 10).decode()
    for event in [
        {"type": "input_audio_buffer.committed", "item_id": "item_u"},
        {"type": "response.output_audio.delta", "response_id": "resp_old", "delta": delta},
        {"type": "response.created", "response": {"id": "resp_1"}},
        {"type": "response.output_audio.delta", "response_id": "resp_1", "delta": delta},
        {"type": "response.output_audio_transcript.delta", "response_id": "resp_1", "delta": "Oi"},
        {"type": "response.done", "response": {"id": "resp_1", "status": "completed"}},
    ]:
        collector.on_event(event)
    assert collector.finished and collector.error is None and collector.reply_text == "Oi"
    assert audio == [b"\x01\x00" * 10]
    assert not collector.user_transcript_settled
    collector.on_event(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_u",
            "transcript": " Olá ",
        }
    )
    assert collector.user_transcript_settled and collector.user_transcript == "Olá"


def test_the_collector_fails_on_an_error_or_a_failed_response():
    errored = ReplyCollector(lambda _: None, wants_user_transcript=False)
    errored.on_event({"type": "error", "error": {"code": "rate_limit_exceeded", "message": "x"}})
    assert errored.finished and errored.error.startswith("rate_limit_exceeded")
    failed = ReplyCollector(lambda _: None, wants_user_transcript=False)
    failed.on_event({"type": "response.created", "response": {"id": "r"}})
    failed.on_event(
        {
            "type": "response.done",
            "response": {
                "id": "r",
                "status": "failed",
                "status_details": {"error": {"message": "server error"}},
            },
        }
    )
    assert failed.error == "response failed: server error"


def test_whatsapp_settings_are_read_and_checked():
    settings = Settings.from_env(
        {
            "WHATSAPP_SESSION_IDLE_S": "240",
            "MAX_MEDIA_BYTES": "1048576",
            "MAX_VOICE_NOTE_S": "120",
            "MEDIA_TTL_S": "900",
            "WHATSAPP_CONCURRENCY": "4",
        }
    )
    assert (settings.whatsapp_session_idle_s, settings.max_media_bytes) == (240.0, 1048576)
    assert (settings.max_voice_note_s, settings.media_ttl_s) == (120, 900)
    assert settings.whatsapp_concurrency == 4
    defaults = Settings.from_env({})
    assert defaults.max_media_bytes == 16 * 1024 * 1024 and defaults.media_ttl_s == 3600
    for name, bad in [("MEDIA_TTL_S", "10"), ("MAX_VOICE_NOTE_S", "abc")]:
        with pytest.raises(SettingsError) as err:
            Settings.from_env({name: bad})
        assert err.value.variable == name
