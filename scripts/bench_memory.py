"""What keeping memory right costs, for BENCHMARKS.md (issue 11).

Run: .venv/bin/python scripts/bench_memory.py [--people 2000] [--turns-each 50]

- writes: `add_turn` (a transaction since issue 11) and `save_reply` with its two turns;
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
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from openai import AsyncOpenAI

from gateway.bridge import RealtimeSession, voice_note_session
from gateway.memory import instructions_for, load_memory_marked, news_since
from gateway.persona import load_persona
from gateway.settings import Settings
from gateway.stats import percentile
from gateway.store import Store
from gateway.store.store import Arrival, WhatsAppReply
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator


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
    args = parser.parse_args()
    persona = load_persona("endrigo")
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(f"sqlite:///{Path(tmp) / 'bench.db'}")
        ids = await fill(store, args.people, args.turns_each)
        print(f"store: {args.people} people x {args.turns_each} turns")
        person = await store.person_by_id(ids[len(ids) // 2])
        assert person is not None
        chat = await store.start_conversation(person.id, "whatsapp")
        call = await store.start_conversation(person.id, "call")

        async def add_turn() -> None:
            await store.add_turn(call, "user", "tenho uma fazenda")

        print("add_turn (one transaction)   ", quantiles(await timed(add_turn, args.runs)))
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
        await store.close()


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
