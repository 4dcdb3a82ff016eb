"""What keeping memory right costs, for BENCHMARKS.md (issue 11).

Run: .venv/bin/python scripts/bench_memory.py [--people 2000] [--turns-each 50]
         [--store sqlite|postgres]

- writes: `add_turn` (a transaction since issue 11), a call's four turns, all ten writes of a
  short call (`one_call`), and `save_reply` with its two turns; on either store (`--store`,
  scripts/bench_db.py: a temp SQLite file or a fresh database on a throwaway PostgreSQL cluster);
- news: the query and item a warm WhatsApp session runs before each turn (`news_since`),
  with nothing new and with a call's four turns new;
- reopen: the alternative, a new Realtime session with freshly composed instructions, timed
  to `session.updated` against the in-process simulator over loopback (a floor: the real API
  adds the network and TLS).

Medians and 99th percentiles in milliseconds, on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's gateway, and tests.pg for --store postgres

from openai import AsyncOpenAI  # noqa: E402

from gateway.bridge import RealtimeSession, voice_note_session  # noqa: E402
from gateway.memory import instructions_for, load_memory_marked, news_since  # noqa: E402
from gateway.persona import Persona, load_persona  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.stats import percentile  # noqa: E402
from gateway.store import Store  # noqa: E402
from gateway.store.store import Arrival, WhatsAppReply  # noqa: E402
from scripts.bench_db import add_store_option, database_url  # noqa: E402
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator  # noqa: E402

CALL_TURNS = (
    ("user", "Oi, quem fala?"),
    ("assistant", "Olá! Aqui é o Endrigo. Em que posso ajudar?"),
    ("user", "tenho uma fazenda em Jaboticabal"),
    ("assistant", "Que ótimo! Conte-me mais sobre ela."),
)


def quantiles(samples: list[float]) -> str:
    median, p99 = percentile(samples, 50), percentile(samples, 99)
    return f"median {median:7.3f} ms   p99 {p99:7.3f} ms   (n={len(samples)})"


async def timed(fn: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    await fn()  # warm-up
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def fill(store: Store, people: int, turns_each: int) -> list[int]:
    ids = []
    for n in range(people):
        person = await store.person_for(f"+55169{n:08d}", name=f"Pessoa {n}")
        conversation = await store.start_conversation(person.id, "whatsapp")
        async with store.transaction():
            for t in range(turns_each):
                role = "user" if t % 2 == 0 else "assistant"
                await store._insert_turn(conversation, role, f"mensagem {t} de {n} " + "x" * 80)
        ids.append(person.id)
    return ids


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--turns-each", type=int, default=50)
    parser.add_argument("--runs", type=int, default=500)
    add_store_option(parser)
    args = parser.parse_args()
    persona = load_persona("endrigo")
    with tempfile.TemporaryDirectory() as tmp:
        async with database_url(args.store, Path(tmp)) as (url, what):
            print(f"store: {what}")
            store = await Store.open(url)
            try:
                await measure(store, persona, args)
            finally:
                await store.close()


async def measure(store: Store, persona: Persona, args: argparse.Namespace) -> None:
    ids = await fill(store, args.people, args.turns_each)
    print(f"store: {args.people} people x {args.turns_each} turns")
    person = await store.person_by_id(ids[len(ids) // 2])
    assert person is not None
    chat = await store.start_conversation(person.id, "whatsapp")
    call = await store.start_conversation(person.id, "call")

    async def add_turn() -> None:
        await store.add_turn(call, "user", "tenho uma fazenda")

    print("add_turn (one transaction)   ", quantiles(await timed(add_turn, args.runs)))

    async def four_turns() -> None:
        for role, text in CALL_TURNS:
            await store.add_turn(call, role, text)

    print("a call's 4 turns (4 add_turn)", quantiles(await timed(four_turns, args.runs)))
    calls = iter(range(10**9))

    async def call_writes() -> None:
        await one_call(store, person.e164, f"CA{next(calls):032x}")

    print("one call's 10 writes         ", quantiles(await timed(call_writes, args.runs)))
    print(
        "  (person_for, start_conversation, set_greeting_latency, 4 add_turn, 2 add_usage,"
        " end_conversation: one after another, as gateway.calls makes them)"
    )
    counter = iter(range(10**9))

    async def reply() -> None:
        sid = f"SM{next(counter):032x}"
        # The webhook's own path (a batch of one), not a test-only shortcut.
        await store.accept_inbound_batch([Arrival(person.e164, None, sid, {"Body": "oi"})])
        await store.save_reply(WhatsAppReply(sid, person.id, chat, "model", "Olá!", "oi"))

    print("accept + save_reply (2 turns)", quantiles(await timed(reply, args.runs)))

    memory, _mark = await load_memory_marked(store, person)

    async def no_news() -> None:
        await news_since(store, persona, person.id, latest, chat)

    latest = (await store.turns_since(person.id, 0, None))[-1].id
    print("news_since, nothing new      ", quantiles(await timed(no_news, args.runs)))
    before_call = latest
    for text in ("Oi", "tenho uma fazenda em Jaboticabal", "Que ótimo!", "Até logo"):
        await store.add_turn(call, "user", text)

    async def four_new() -> None:
        item, _ = await news_since(store, persona, person.id, before_call, chat)
        assert item is not None

    print("news_since, 4 turns new      ", quantiles(await timed(four_new, args.runs)))
    item, _ = await news_since(store, persona, person.id, before_call, chat)
    await reopen_cost(persona, memory, len(str(item)))


async def one_call(store: Store, number: str, call_sid: str) -> None:
    """Every write of a short call (two exchanges), in the order gateway.calls makes them."""
    person = await store.person_for(number)
    conversation = await store.start_conversation(person.id, "call", call_sid)
    await store.set_greeting_latency(conversation, 812.0)
    for i, (role, text) in enumerate(CALL_TURNS):
        if role == "user":
            await store.add_turn(conversation, role, text, audio_ms=1800)
        else:
            await store.add_turn(
                conversation, role, text, audio_ms=2400,
                response_latency_ms=640.0, upstream_first_audio_ms=410.0,
            )  # fmt: skip
            await store.add_usage(
                person.id, conversation, f"resp_{call_sid}_{i}",
                input_tokens=900, output_tokens=60, input_audio_tokens=90,
                output_audio_tokens=120, audio_seconds=2.4, model="gpt-realtime",
            )  # fmt: skip
    await store.end_conversation(conversation)


async def reopen_cost(persona, memory, item_chars: int) -> None:
    sim = RealtimeSimulator(RealtimeSimConfig())
    await sim.start(host="127.0.0.1", port=0)
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": sim.base_url})
    client = AsyncOpenAI(api_key="sk-bench", base_url=sim.base_url)
    instructions = instructions_for(persona, "whatsapp_text", memory)

    async def reopen() -> None:
        session = await RealtimeSession.open(
            client, settings.realtime_model, voice_note_session(settings, "marin", instructions)
        )
        while (await session.recv()).get("type") != "session.updated":
            pass
        await session.close()

    print("reopen to session.updated    ", quantiles(await timed(reopen, 30)))
    print(
        f"bytes told: news item {item_chars} chars, reopen instructions {len(instructions)} chars"
    )
    await client.close()
    await sim.close()


if __name__ == "__main__":
    asyncio.run(main())
