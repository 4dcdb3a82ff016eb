"""The store's WhatsApp tables: saved replies (with their turns), outbound statuses, media."""

from datetime import UTC, datetime

import pytest

from gateway.store import Store
from gateway.store.store import WhatsAppReply
from tests.store_helpers import accept_inbound, inbound_record

pytestmark = pytest.mark.both_stores


@pytest.fixture
async def store(database_url):
    s = await Store.open(database_url)
    yield s
    await s.close()


async def accepted(store: Store, sid: str = "SM1") -> int:
    person = await store.person_for("whatsapp:+5516999990001", name="Ana")
    assert await accept_inbound(store, sid, person.id, {"Body": "Olá"})
    return person.id


async def test_a_model_reply_is_saved_with_both_turns_at_once(store):
    person_id = await accepted(store)
    conversation = await store.start_conversation(person_id, "whatsapp")
    reply = WhatsAppReply(
        message_sid="SM1",
        person_id=person_id,
        conversation_id=conversation,
        kind="model",
        text="Oi Ana!",
        user_text="Olá",
        user_audio_ms=2500,
        audio_ms=900,
        media_ids=["abc", "def"],
        response_id="resp_1",
    )
    await store.save_reply(reply)
    assert await store.reply_for("SM1") == reply
    turns = await store.recent_turns(person_id)
    assert [(t.role, t.text, t.audio_ms, t.channel) for t in turns] == [
        ("user", "Olá", 2500, "whatsapp"),
        ("assistant", "Oi Ana!", 900, "whatsapp"),
    ]
    with pytest.raises(Exception, match=r"(?i)unique"):  # a reply is written once
        await store.save_reply(reply)
    assert len(await store.recent_turns(person_id)) == 2


async def test_a_fixed_reply_writes_no_turns(store):
    person_id = await accepted(store)
    fixed = WhatsAppReply("SM1", person_id, None, "fixed", "Pode mandar de novo?")
    await store.save_reply(fixed)
    assert (await store.reply_for("SM1")).media_ids == []
    assert await store.recent_turns(person_id) == []
    assert await store.reply_for("SM2") is None


async def test_outbound_status_only_moves_forward_whatever_the_arrival_order(store):
    await accepted(store)
    # The "sent" callback beats the create's answer, then "delivered" and a late "sent".
    await store.update_outbound_status("SMa", "sent")
    await store.record_outbound("SM1", 0, "text", message_sid="SMa", status="queued")
    await store.record_outbound("SM1", 1, "voice", message_sid="MMb", status="queued")
    await store.update_outbound_status("SMa", "delivered")
    await store.update_outbound_status("SMa", "sent")
    await store.update_outbound_status("MMb", "failed", 63019, "Media failed to download")
    out = await store.outbound_for("SM1")
    assert [(o.part, o.kind, o.message_sid, o.status, o.error_code) for o in out] == [
        (0, "text", "SMa", "delivered", None),
        (1, "voice", "MMb", "failed", 63019),
    ]


async def test_a_refused_create_is_recorded_without_a_sid(store):
    await accepted(store)
    await store.record_outbound(
        "SM1", 0, "text", message_sid=None, status="failed", error_code=63016
    )
    [out] = await store.outbound_for("SM1")
    assert (out.message_sid, out.status, out.error_code) == (None, "failed", 63016)


async def test_media_expires_and_is_swept(store):
    await store.put_media("live", b"OggS1", "audio/ogg", person_id=None, ttl_s=60)
    await store.put_media("old", b"OggS2", "audio/ogg", person_id=None, ttl_s=-1)
    assert await store.get_media("live") == (b"OggS1", "audio/ogg")
    assert await store.get_media("old") is None
    assert await store.get_media("nope") is None
    assert await store.delete_expired_media() == 1
    assert await store.delete_expired_media() == 0


async def test_next_due_and_record_of_the_queue(store):
    assert await store.next_inbound_due() is None
    await accepted(store)
    due = await store.next_inbound_due()
    assert due is not None and due <= datetime.now(UTC)
    await store.claim_inbound()
    await store.finish_inbound("SM1", error="twilio 500", retry_in_s=30)
    assert (await store.next_inbound_due() - datetime.now(UTC)).total_seconds() > 25
    record = await inbound_record(store, "SM1")
    assert (record.status, record.attempts, record.error) == ("pending", 1, "twilio 500")


async def test_a_persons_later_message_waits_for_the_earlier_one_others_do_not(store):
    ana = await accepted(store, "SM1")
    assert await accept_inbound(store, "SM2", ana, {"Body": "E mais uma coisa"})
    bruno = await store.person_for("whatsapp:+5516999990002", name="Bruno")
    assert await accept_inbound(store, "SM3", bruno.id, {"Body": "Oi"})
    assert (await store.claim_inbound()).message_sid == "SM1"
    assert (await store.claim_inbound()).message_sid == "SM3"  # SM2 waits behind Ana's SM1
    assert await store.claim_inbound() is None
    assert await store.next_inbound_due() is None  # SM2 goes when SM1 ends, not by the clock
    await store.finish_inbound("SM1", error="twilio 503", retry_in_s=30)
    assert await store.claim_inbound() is None  # SM1 pending its retry still holds SM2 back
    assert (await store.next_inbound_due() - datetime.now(UTC)).total_seconds() > 25  # SM1's
    await store.finish_inbound("SM3")
    assert await store.claim_inbound() is None
    await store.finish_inbound("SM1", error="twilio 503", retry_in_s=0)
    assert (await store.claim_inbound()).message_sid == "SM1"  # its retry comes first
    await store.finish_inbound("SM1")
    assert (await store.claim_inbound()).message_sid == "SM2"
