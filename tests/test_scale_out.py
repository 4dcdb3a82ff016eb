"""Two gateway processes on one PostgreSQL store (issue 14): 200 WhatsApp messages from 20
people spread across both, one instance killed with SIGKILL mid-run. Every message is
answered exactly once, each person's answers come in the order they wrote, and Twilio is
never asked to send the same answer twice.

The model (the Realtime simulator) answers by repeating the message tags it was given
("m07-3"), so the text messages Twilio received say which messages each answer covers: a
person's messages written while an earlier one was being answered may be answered together
in one reply (the queue merges them), but never twice and never out of order.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from simulators.realtime import RealtimeSimConfig
from simulators.whatsapp_sender import WhatsAppSender, new_sid
from tests.conftest import ACCOUNT_SID as ACCOUNT
from tests.conftest import AUTH_TOKEN as AUTH
from tests.conftest import _admin
from tests.store_helpers import connect
from tests.test_call_faults import eventually
from tests.test_shutdown import gateway_env, start_process

PEOPLE = 20
EACH = 10
KILL_AFTER_TAGS = 70  # messages answered before instance A is killed, with more in flight
TAG = re.compile(r"m\d\d-\d")


def echo_tags(_session, item) -> str:
    tags = TAG.findall(item.text() if item is not None else "")
    return "Anotado: " + " ".join(tags) if tags else "Olá!"


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=150, speed=8.0, reply=echo_tags)


@pytest.fixture
def store_url(pg_url):
    name = f"scale_out_{os.getpid()}"
    _admin(pg_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _admin(pg_url, f"CREATE DATABASE {name}")
    yield urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}"))
    _admin(pg_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_two_instances_one_killed_every_message_answered_once_in_order(
    tmp_path, realtime_sim, twilio_sim, store_url
):
    instances = []
    for name in ("a", "b"):
        env, url = gateway_env(tmp_path, realtime_sim, twilio_sim)
        env.update(
            DATABASE_URL=store_url,
            INSTANCE_ID=name,
            INSTANCE_TIMEOUT_S="1.5",
            WHATSAPP_BURST="1000",
            WHATSAPP_PER_HOUR="100000",
            DAILY_BUDGET_USD="100000",
            LOG_LEVEL="WARNING",
        )
        instances.append((await start_process(env, url), url))
    (proc_a, url_a), (proc_b, url_b) = instances
    killed = asyncio.Event()

    async def person(p: int) -> None:
        number = f"+55169990{p:05d}"
        senders = [
            WhatsAppSender(url, url, AUTH, ACCOUNT, from_number=number) for url in (url_a, url_b)
        ]
        try:
            for k in range(EACH):
                sid = new_sid("SM")
                first = (p + k) % 2  # spread across both, as a load balancer would
                for target in (first, 1 - first):
                    try:
                        result = await senders[target].send_text(f"Mensagem m{p:02d}-{k}", sid)
                    except aiohttp.ClientError:  # that instance is gone: Twilio tries again
                        continue
                    if result.status == 200:
                        break
                else:
                    raise AssertionError(f"{sid} accepted by neither instance")
                await asyncio.sleep(0.15 + 0.05 * (p % 4))  # a person types
        finally:
            for sender in senders:
                await sender.close()

    async def kill_a_mid_run() -> None:
        await eventually(lambda: len(tags_answered(twilio_sim)) >= KILL_AFTER_TAGS, 60)
        assert len(tags_answered(twilio_sim)) < PEOPLE * EACH  # mid-run
        proc_a.send_signal(signal.SIGKILL)
        await proc_a.wait()
        killed.set()

    try:
        await asyncio.wait_for(
            asyncio.gather(kill_a_mid_run(), *(person(p) for p in range(PEOPLE))), 90
        )
        assert killed.is_set()
        await eventually(lambda: len(tags_answered(twilio_sim)) >= PEOPLE * EACH, 60)
        await asyncio.sleep(2.0)  # anything sent twice would arrive meanwhile
    finally:
        for proc, _ in instances:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 10)

    by_person: dict[str, list[str]] = defaultdict(list)
    voice_notes: dict[str, int] = defaultdict(int)
    texts: dict[str, int] = defaultdict(int)
    for message in twilio_sim.messages:
        if message.body.startswith("Anotado"):
            by_person[message.to].extend(TAG.findall(message.body))
            texts[message.to] += 1
        elif message.media_urls:
            voice_notes[message.to] += 1
    assert len(by_person) == PEOPLE
    for to, tags in by_person.items():
        p = tags[0][1:3]
        assert tags == [f"m{p}-{k}" for k in range(EACH)], (to, tags)  # once each, in order
        assert voice_notes[to] == texts[to], to  # every reply's voice note, once
    with connect(store_url) as db:
        statuses = db.execute(
            "SELECT status, COUNT(*) FROM inbound_messages GROUP BY status"
        ).fetchall()
        taken_over = db.execute(
            "SELECT COUNT(*) FROM inbound_messages WHERE attempts >= 2"
        ).fetchone()[0]
    assert dict(statuses) == {"done": PEOPLE * EACH}
    print(f"claims of A taken over by B: {taken_over}")
    stderr_b = (await proc_b.stderr.read()).decode(errors="replace") if proc_b.stderr else ""
    assert "Traceback" not in stderr_b, stderr_b[-3000:]
    found = stderr_b.count("was already at Twilio")
    print(f"parts B found already sent by A, and did not send again: {found}")


def tags_answered(twilio_sim) -> set[str]:
    return {tag for m in twilio_sim.messages for tag in TAG.findall(m.body)}
