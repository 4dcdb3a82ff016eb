"""WhatsApp benchmarks, for BENCHMARKS.md.

Run: .venv/bin/python scripts/bench_whatsapp.py [--rounds 3] [--notes 5] [--queue 200]
         [--store sqlite|postgres]

The gateway's store is a temp SQLite file, or with `--store postgres` a fresh database on a
throwaway PostgreSQL cluster (tests/pg.py, or $TEST_DATABASE_URL's server; scripts/bench_db.py).

1. Webhook answer time: 200 signed WhatsApp webhooks posted at once to a gateway running in
   this process (on uvloop, like `python -m gateway`), against the Twilio and Realtime
   simulators; p50/p99 of the time to the `200 <Response/>`. The replies are produced in the
   background meanwhile, as in production; each round waits for them before the next.
   The posting client shares the process and its CPU, so the figures are pessimistic.
2. Gateway overhead of one voice note end to end: from posting the webhook to Twilio accepting
   the voice-note message, minus the model's time as the Realtime simulator measured it
   (response.created -> response.done: its configured first-audio latency plus generation).
   What is left is ours: webhook, queue, download, decode, appends, encode, publish, the text
   message's REST call and the voice note's. Cold = a new person (the Realtime connect is paid),
   warm = the same person again (the session is reused).
3. Queue throughput: 20 people hold a conversation at once, each sending its next text as
   soon as the voice note answering the previous one was accepted by the Twilio simulator,
   until 200 texts (`--queue`) were answered; messages answered per second, from the first
   post to the last voice note, and each message's post -> voice-note time. The model's time
   is included (the Realtime simulator at the same fast setting as part 1: 50 ms to first
   audio, 50x real time). One at a time per person, so texts are never merged into one turn;
   the per-person turn limit and the daily budget are raised out of the way for the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import platform
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's gateway, and tests.pg for --store postgres

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402

from gateway.__main__ import new_event_loop  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.stats import percentile  # noqa: E402
from gateway.transcode import encode_ogg_opus  # noqa: E402
from scripts.bench_db import add_store_option, database_url  # noqa: E402
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator  # noqa: E402
from simulators.speech import speech_pcm24k  # noqa: E402
from simulators.twilio import TwilioSimulator  # noqa: E402

ACCOUNT_SID = "AC" + "be" * 16
AUTH_TOKEN = "bench-auth-token"
OUR_NUMBER = "whatsapp:+14155238886"
CONCURRENT = 200
NOTE_MS = 10_000
QUEUE_PEOPLE = 20
FAST_MODEL = (50.0, 50.0)  # first-audio latency ms, speed: parts 1 and 3 (replies quickly)


@dataclass
class Bench:
    gateway_url: str
    validator: RequestValidator
    http: aiohttp.ClientSession
    twilio: TwilioSimulator
    realtime: RealtimeSimulator

    def form(self, number: str, body: str = "", media_url: str | None = None) -> dict[str, str]:
        sid = ("MM" if media_url else "SM") + secrets.token_hex(16)
        form = {
            "SmsMessageSid": sid,
            "NumMedia": "1" if media_url else "0",
            "ProfileName": "Bench",
            "MessageType": "audio" if media_url else "text",
            "SmsSid": sid,
            "WaId": number.lstrip("+"),
            "SmsStatus": "received",
            "Body": body,
            "To": OUR_NUMBER,
            "NumSegments": "1",
            "ReferralNumMedia": "0",
            "MessageSid": sid,
            "AccountSid": ACCOUNT_SID,
            "From": f"whatsapp:{number}",
            "ApiVersion": "2010-04-01",
        }
        if media_url:
            form |= {"MediaContentType0": "audio/ogg", "MediaUrl0": media_url}
        return form

    def signed(self, form: dict[str, str]) -> tuple[dict[str, str], str]:
        url = self.gateway_url + "/webhook/whatsapp"
        return form, self.validator.compute_signature(url, form)

    async def post(self, form: dict[str, str]) -> float:
        url = self.gateway_url + "/webhook/whatsapp"
        headers = {"X-Twilio-Signature": self.validator.compute_signature(url, form)}
        started = time.perf_counter()
        async with self.http.post(url, data=form, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
        return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def webhook_rounds(bench: Bench, rounds: int) -> list[float]:
    cfg = bench.realtime.config
    cfg.first_audio_latency_ms, cfg.speed = FAST_MODEL  # replies in the background, quickly
    warmup = [bench.signed(bench.form(f"+55169000{i:05d}", "aquecimento")) for i in range(20)]
    await asyncio.to_thread(post_burst, bench.gateway_url, warmup)
    sent = 40
    await bench.twilio.wait_for_messages(sent, timeout=60, settled=True)
    times: list[float] = []
    for r in range(rounds):
        burst = [
            bench.signed(bench.form(f"+55169{r:02d}{i:05d}", "Olá, tudo bem?"))
            for i in range(CONCURRENT)
        ]
        # The client runs in another process, so the gateway has this one's CPU to itself.
        round_times = await asyncio.to_thread(post_burst, bench.gateway_url, burst)
        times += round_times
        print(
            f"  round {r + 1}: p50 {percentile(round_times, 50) * 1000:6.1f} ms   "
            f"p99 {percentile(round_times, 99) * 1000:6.1f} ms   "
            f"max {max(round_times) * 1000:6.1f} ms"
        )
        sent += 2 * CONCURRENT
        await bench.twilio.wait_for_messages(sent, timeout=120, settled=True)
    return times


def post_burst(gateway_url: str, signed: list[tuple[dict[str, str], str]]) -> list[float]:
    """Post every webhook at once from a separate process; the time to each answer."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_client_process, (gateway_url, signed))


def _client_process(gateway_url: str, signed: list[tuple[dict[str, str], str]]) -> list[float]:
    """A lean HTTP/1.1 client: requests pre-encoded, one keep-alive connection each.

    aiohttp's client spends ~0.2 ms of CPU per request; 200 of them would be 40 ms of the
    client's own queueing counted as the gateway's answer time.
    """
    target = urlsplit(gateway_url)

    def raw_request(form: dict[str, str], signature: str) -> bytes:
        body = urlencode(form).encode()
        head = (
            f"POST /webhook/whatsapp HTTP/1.1\r\nHost: {target.netloc}\r\n"
            f"X-Twilio-Signature: {signature}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def exchange(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> float:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        elapsed = time.perf_counter() - started
        assert status == 200, status
        return elapsed

    async def burst() -> list[float]:
        requests = [raw_request(form, signature) for form, signature in signed]
        connections = [
            await asyncio.open_connection(target.hostname, target.port) for _ in requests
        ]
        try:
            return list(
                await asyncio.gather(
                    *(exchange(r, w, q) for (r, w), q in zip(connections, requests, strict=True))
                )
            )
        finally:
            for _, writer in connections:
                writer.close()

    return asyncio.run(burst())


async def queue_throughput(bench: Bench, messages: int, people: int) -> None:
    """`people` conversations at once, `messages` texts in all; see part 3 of the docstring."""
    cfg = bench.realtime.config
    cfg.first_audio_latency_ms, cfg.speed = FAST_MODEL
    twilio = bench.twilio
    numbers = [f"+55167{p:07d}" for p in range(people)]
    answered = {n: asyncio.Event() for n in numbers}
    voice_notes: dict[str, int] = defaultdict(int)
    sessions_before = len(bench.realtime.sessions)  # these people are new: new sessions
    seen = len(twilio.messages)

    async def watch() -> None:  # one reader of the simulator's messages, not 20 pollers
        nonlocal seen
        while True:
            await twilio.wait_for_messages(seen + 1, timeout=3600)
            for message in twilio.messages[seen:]:
                number = message.to.removeprefix("whatsapp:")
                if message.media_urls and number in answered:
                    voice_notes[number] += 1
                    answered[number].set()
            seen = len(twilio.messages)

    reply_times: list[float] = []
    turns = [messages // people + (p < messages % people) for p in range(people)]

    async def converse(number: str, count: int) -> None:
        for k in range(count):
            answered[number].clear()
            posted = time.monotonic()
            await bench.post(bench.form(number, f"Mensagem {k + 1}: queria saber do curso."))
            while voice_notes[number] < k + 1:
                await answered[number].wait()
                answered[number].clear()
            reply_times.append(time.monotonic() - posted)

    deadline_s = max(120.0, messages / 2)  # ten times what a healthy gateway needs
    watcher = asyncio.create_task(watch())
    try:
        started = time.monotonic()
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*(converse(n, c) for n, c in zip(numbers, turns, strict=True)))
        elapsed = time.monotonic() - started
    except TimeoutError:
        raise SystemExit(
            f"queue: {len(reply_times)} of {messages} texts answered in {deadline_s:.0f} s "
            "(the gateway's errors, if any, are logged above)"
        ) from None
    finally:
        watcher.cancel()
    model = [
        r.done_at - r.created_at
        for s in bench.realtime.sessions[sessions_before:]
        for r in s.responses
        if r.done_at is not None
    ]
    print(
        f"  {messages} texts answered in {elapsed:.2f} s: {messages / elapsed:.1f} messages/s   "
        f"post -> voice note p50 {percentile(reply_times, 50) * 1000:6.1f} ms   "
        f"p99 {percentile(reply_times, 99) * 1000:6.1f} ms"
    )
    if model:
        print(f"  model time per turn (included): median {statistics.median(model) * 1000:.1f} ms")
    await twilio.wait_for_messages(len(twilio.messages), timeout=60, settled=True)


async def voice_note_overhead(bench: Bench, number: str, note: bytes) -> tuple[float, float]:
    """(total s, model s) for one voice note from this number."""
    sent_before = len(bench.twilio.messages)
    form = bench.form(number, media_url="pending")
    form["MediaUrl0"] = bench.twilio.add_media(note, "audio/ogg", message_sid=form["MessageSid"])
    started = time.monotonic()
    await bench.post(form)
    try:
        messages = await bench.twilio.wait_for_messages(sent_before + 2, timeout=60)
    except TimeoutError:
        raise SystemExit("the voice note was not answered in 60 s") from None
    voice = messages[-1]
    assert voice.media_urls, "the second message should be the voice note"
    response = next(
        r
        for s in reversed(bench.realtime.sessions)
        for r in reversed(s.responses)
        if r.done_at is not None
    )
    total = voice.accepted_at - started
    return total, response.done_at - response.created_at


async def voice_note_rounds(bench: Bench, count: int) -> None:
    cfg = bench.realtime.config
    cfg.first_audio_latency_ms, cfg.speed = 300.0, 4.0  # the sandbox defaults; subtracted
    note = encode_ogg_opus(speech_pcm24k(NOTE_MS, seed=2))
    cold, warm = [], []
    for i in range(count):
        number = f"+55168{i:07d}"
        cold.append(await voice_note_overhead(bench, number, note))
        warm.append(await voice_note_overhead(bench, number, note))
    for label, runs in (("cold (connect)", cold), ("warm (reused) ", warm)):
        totals = [t for t, _ in runs]
        overheads = [t - m for t, m in runs]
        models = [m for _, m in runs]
        print(
            f"  {label}: total {statistics.median(totals) * 1000:7.1f} ms, "
            f"model {statistics.median(models) * 1000:7.1f} ms, "
            f"gateway overhead median {statistics.median(overheads) * 1000:6.1f} ms "
            f"(min {min(overheads) * 1000:.1f}, max {max(overheads) * 1000:.1f})"
        )


async def run(args: argparse.Namespace) -> None:
    realtime = await RealtimeSimulator(RealtimeSimConfig()).start()
    twilio = TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, status_callback_delay_s=0.05)
    await twilio.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        async with database_url(args.store, Path(tmp)) as (url, what):
            print(f"store: {what}")
            await run_gateway(args, url, port, realtime, twilio)
    await twilio.close()
    await realtime.close()


async def run_gateway(
    args: argparse.Namespace,
    url: str,
    port: int,
    realtime: RealtimeSimulator,
    twilio: TwilioSimulator,
) -> None:
    env = {
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": realtime.base_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": twilio.base_url,
        "DATABASE_URL": url,
        # The owner's per-person limits are not what is measured (part 3 sends 10 each).
        "WHATSAPP_BURST": "1000",
        "DAILY_BUDGET_USD": "100000",
        "PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "WARNING",
    }
    runner = web.AppRunner(create_app(Settings.from_env(env)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        connector = aiohttp.TCPConnector(limit=0)  # all 200 really at once
        async with aiohttp.ClientSession(connector=connector) as http:
            bench = Bench(
                f"http://127.0.0.1:{port}", RequestValidator(AUTH_TOKEN), http, twilio, realtime
            )
            if args.rounds:
                rounds = args.rounds
                print(
                    f"Webhook answer time, {CONCURRENT} concurrent signed posts x {rounds} rounds:"
                )
                times = await webhook_rounds(bench, rounds)
                print(
                    f"  all:     p50 {percentile(times, 50) * 1000:6.1f} ms   "
                    f"p99 {percentile(times, 99) * 1000:6.1f} ms   (n={len(times)})"
                )
            if args.queue:
                print(
                    f"\nQueue throughput, {args.queue} texts from {QUEUE_PEOPLE} people in "
                    "conversation (model time included):"
                )
                await queue_throughput(bench, args.queue, QUEUE_PEOPLE)
            if args.notes:
                print(f"\nOne {NOTE_MS // 1000} s voice note end to end, model time excluded:")
                await voice_note_rounds(bench, args.notes)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="part 1's bursts (0: skip)")
    parser.add_argument("--notes", type=int, default=5, help="part 2's people (0: skip)")
    parser.add_argument("--queue", type=int, default=200, help="texts for part 3 (0: skip)")
    add_store_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}")
    loop = new_event_loop()
    try:
        loop.run_until_complete(run(args))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
