"""The dashboard: admin-token gate, what its JSON says during and after a call, escaping of
caller text, and what a person sees in a real (headless Chromium) browser."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import COOKIE
from gateway.dashboard import DATA_URL
from gateway.dashboard.snapshot import histogram, summary
from gateway.stats import percentile
from gateway.store import Lead, Store
from gateway.store.reports import latency_samples, recent_people
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

ADMIN = "admin-token-for-tests"
PUBLIC = "https://gw.example.test"
CALLER = "+5516999990001"
MASKED = "+55…0001"
SAID = "Quero anunciar meu apartamento em Ribeirão"
REPLY = "Olá, tudo bem? Aqui é o Endrigo."
EVIL_TEXT = "<script>alert(1)</script>"
EVIL_NAME = '<img src=x onerror="alert(2)">'
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 30


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(
        first_audio_latency_ms=80,
        speed=8.0,
        ms_per_char=30,
        reply_text=REPLY,
        input_transcript=SAID,
    )


@pytest.fixture
async def gateway(start_gateway, live_env):
    return await start_gateway({**live_env, "PUBLIC_BASE_URL": PUBLIC, "ADMIN_TOKEN": ADMIN})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: the gateway is at 127.0.0.1, and the default jar ignores cookies from IPs.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def bearer(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def fetch_json(http: aiohttp.ClientSession, gateway) -> dict:
    async with http.get(gateway.url + DATA_URL, headers=bearer()) as response:
        assert response.status == 200
        return await response.json()


async def call_with_one_turn(gateway) -> SimulatedCaller:
    """A connected call that heard the greeting, spoke once and heard the reply."""
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    assert (await caller.dial()).status == 200
    await caller.connect()
    await caller.wait_playback_idle(quiet_s=0.3)
    await caller.speak_and_wait(speech_mulaw(1000, seed=4))
    await caller.wait_playback_idle(quiet_s=0.3)
    return caller


async def poll_until(predicate, fetch) -> dict:
    """Poll the dashboard data until `predicate` holds (store writes trail the call a bit)."""
    async with asyncio.timeout(5):
        while True:
            data = await fetch()
            if predicate(data):
                return data
            await asyncio.sleep(0.05)


async def seed_evil_person(gateway) -> None:
    store = gateway.runtime.store
    person = await store.person_for("+5511988887777", name=EVIL_NAME)
    conversation = await store.start_conversation(person.id, "whatsapp")
    await store.add_turn(conversation, "user", EVIL_TEXT)


def texts(data: dict) -> list[str]:
    return [t["text"] for p in data["people"] for c in p["conversations"] for t in c["turns"]]


# ---- the gate ------------------------------------------------------------------------------


async def test_without_an_admin_token_the_dashboard_is_off(start_gateway, live_env, http):
    gw = await start_gateway(live_env)
    for path in ("/", DATA_URL, "/?token=anything"):
        async with http.get(gw.url + path, headers=bearer()) as response:
            assert response.status == 404
            assert "ADMIN_TOKEN" in await response.text()


async def test_no_credentials_get_401_with_how_to_get_in(gateway, http):
    for path in ("/", DATA_URL):
        async with http.get(gateway.url + path) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "/?token=" in await response.text()


async def test_a_wrong_token_gets_403_and_no_cookie(gateway, http):
    for path, headers in [
        ("/", bearer("wrong")),
        (DATA_URL, bearer("wrong")),
        ("/", bearer("çãé-not-ascii")),  # must not crash compare_digest
        ("/", {"Authorization": f"Basic {ADMIN}"}),
        ("/?token=wrong", {}),
    ]:
        async with http.get(gateway.url + path, headers=headers) as response:
            assert response.status == 403, (path, headers)
            assert "Set-Cookie" not in response.headers
    async with http.get(gateway.url + DATA_URL, cookies={COOKIE: ADMIN}) as response:
        assert response.status == 401  # the raw token is not a session value


async def test_every_admin_answer_stays_out_of_caches_referers_and_sniffing(gateway, http):
    for path in (DATA_URL, "/admin/privacy-requests", "/admin/people/+5516999990001/usage"):
        async with http.get(gateway.url + path, headers=bearer()) as response:
            assert response.status in (200, 404), path
            headers = response.headers
            assert headers["Cache-Control"] == "no-store", path
            assert headers["Referrer-Policy"] == "no-referrer", path
            assert headers["X-Content-Type-Options"] == "nosniff", path


async def test_the_right_bearer_token_gets_the_page(gateway, http):
    async with http.get(gateway.url + "/", headers=bearer()) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-store"
        assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]
        body = await response.text()
    assert "Chamadas ao vivo" in body and DATA_URL in body
    assert ADMIN not in body


async def test_token_in_the_query_once_starts_a_strict_httponly_cookie_session(gateway, http):
    async with http.get(gateway.url + f"/?token={ADMIN}") as response:
        assert response.status == 200
        cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and ADMIN not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    for path in ("/", DATA_URL):  # the jar sends the cookie; no token any more
        async with http.get(gateway.url + path) as response:
            assert response.status == 200, path


# ---- what it shows -------------------------------------------------------------------------


async def test_the_data_shows_the_live_call_then_the_transcript_and_latency(gateway, http):
    caller = await call_with_one_turn(gateway)
    async with caller:
        async with http.get(gateway.url + DATA_URL, headers=bearer()) as response:
            raw = await response.text()
        assert CALLER not in raw and CALLER[1:] not in raw  # never the full number
        data = await fetch_json(http, gateway)
        [live] = data["live_calls"]
        assert live["call_sid"] == caller.call_sid and live["number"] == MASKED
        assert live["turns"] == 1 and live["last_latency_ms"] > 0 and live["greeting_ms"] > 0
        assert live["duration_s"] > 0
        await caller.hangup()
    data = await poll_until(
        lambda d: not d["live_calls"] and d["latency"]["response"]["count"],
        lambda: fetch_json(http, gateway),
    )
    assert data["live_calls"] == []
    [person] = data["people"]
    assert person["number"] == MASKED
    [conversation] = person["conversations"]
    assert conversation["channel"] == "call" and conversation["ended_at"]
    roles_texts = [(t["role"], t["text"]) for t in conversation["turns"]]
    assert ("user", SAID) in roles_texts and ("assistant", REPLY) in roles_texts
    latency = data["latency"]
    assert latency["greeting"]["count"] == 1 and latency["response"]["count"] == 1
    assert latency["upstream"]["count"] == 1
    assert 0 < latency["response"]["p50"] == latency["response"]["p99"]
    assert sum(latency["histogram"]["counts"]) == 1
    assert data["health"]["store"]["reachable"] is True and data["health"]["version"]


async def test_caller_text_is_never_markup_in_the_page(gateway, http):
    await seed_evil_person(gateway)
    data = await fetch_json(http, gateway)
    assert EVIL_TEXT in texts(data)  # JSON carries the text as it was said
    async with http.get(gateway.url + "/", headers=bearer()) as response:
        body = await response.text()
    assert EVIL_TEXT not in body and "<img" not in body and "alert(1)" in body
    # Only the page's own two scripts: the JSON data block and the nonce-bearing one.
    assert len(re.findall(r"<script", body)) == 2
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])[1]
    assert f'<script nonce="{nonce}">' in body


async def test_reports_latest_people_first_and_the_greeting_apart(tmp_path):
    store = await Store.open(f"sqlite:///{tmp_path}/reports.db")
    try:
        early = await store.person_for("+5516900000001")
        late = await store.person_for("+5516900000002", name="Ana")
        old_call = await store.start_conversation(early.id, "call")
        await store.set_greeting_latency(old_call, 250.0)  # the greeting has its own column
        await store.add_turn(old_call, "assistant", "oi")
        await store.add_turn(old_call, "assistant", "oi", response_latency_ms=900.0)
        for _ in range(4):
            await store.start_conversation(late.id, "whatsapp")
        await asyncio.sleep(0.01)  # timestamps have millisecond resolution
        await store.add_turn(old_call, "user", "de novo")  # early speaks last
        people = await recent_people(store, conversations=3)
        samples = await latency_samples(store)
    finally:
        await store.close()
    assert [p.e164 for p in people] == [early.e164, late.e164]
    assert [t.text for t in people[0].conversations[0].turns] == ["oi", "oi", "de novo"]
    assert len(people[1].conversations) == 3 and people[1].name == "Ana"
    assert (samples.greeting_ms, samples.response_ms) == ([250.0], [900.0])


def test_percentiles_and_histogram():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    assert summary([300.0]) == {"count": 1, "p50": 300.0, "p95": 300.0, "p99": 300.0}
    assert histogram([-1, 0, 199.9, 200, 5000], edges=(0, 200, 1000)) == [3, 1, 1]


# ---- in a browser --------------------------------------------------------------------------


async def chromium(*args: str, user_data: Path) -> str:
    """Run Debian's headless Chromium; its stdout (the DOM for --dump-dom)."""
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in CI; the page is our own
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        f"--user-data-dir={user_data}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CHROMIUM_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} missing: apt-get install -y chromium (CI installs it in .ci/run)",
)
async def test_a_person_sees_the_call_transcript_and_percentiles_in_chromium(gateway, tmp_path):
    await seed_evil_person(gateway)
    caller = await call_with_one_turn(gateway)
    async with caller:
        # The budget is virtual time: the script's 3 s poll runs twice, at no real cost.
        dom = await chromium(
            "--virtual-time-budget=7000",
            "--dump-dom",
            f"{gateway.url}/?token={ADMIN}",
            user_data=tmp_path / "chromium",
        )
    assert CALLER not in dom
    # The caller's "script" and the name's <img> must not have become elements anywhere.
    assert "<script>alert(1)" not in dom and "<img" not in dom
    # What is on screen: the DOM without the scripts (whose source and data hold the words).
    visible = re.sub(r"\s+", " ", re.sub(r"<script\b.*?</script>", "", dom, flags=re.S))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in visible  # shown as the text it is
    assert '&lt;img src=x onerror="alert(2)"&gt;' in visible
    # The script polled the JSON endpoint, with the cookie the ?token= visit set.
    assert re.search(r'<span id="stamp" class="stamp">atualizado às \d', visible)
    row = re.search(r"<tr><td><code>(CA\w+)</code></td><td>([^<]+)</td>", visible)
    assert row is not None and row.groups() == (caller.call_sid, MASKED)
    assert f'<li class="user"><span class="role">Pessoa</span>{SAID}</li>' in visible
    assert f'<span class="role">Clone</span>{REPLY}<span class="meta">' in visible
    p50 = re.search(
        r"Fim da fala → 1º quadro da resposta</td><td class=\"num\">1</td>"
        r"<td class=\"num\">(\d+) ms</td>",
        visible,
    )
    assert p50 is not None and int(p50[1]) > 0
    assert "<rect" in visible  # the histogram was drawn
    assert "openai · gpt-realtime-2.1 · cedar" in visible  # which engine and voice speak


@pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} missing: apt-get install -y chromium (CI installs it in .ci/run)",
)
async def test_a_person_sees_the_leads_as_text_in_chromium(gateway, tmp_path):
    store = gateway.runtime.store
    person = await store.person_for(CALLER)
    conversation = await store.start_conversation(person.id, "call")
    lead = Lead(EVIL_NAME, "real_estate", city=EVIL_TEXT)
    await store.save_lead(person.id, conversation, lead, channel="call")
    dom = await chromium(
        "--virtual-time-budget=4000",
        "--dump-dom",
        f"{gateway.url}/?token={ADMIN}",
        user_data=tmp_path / "chromium",
    )
    assert CALLER not in dom and "<img" not in dom and "<script>alert(1)" not in dom
    visible = re.sub(r"\s+", " ", re.sub(r"<script\b.*?</script>", "", dom, flags=re.S))
    row = re.search(r'<section id="leads".*?<tbody><tr>(.*?)</tr>', visible)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row[1])
    assert cells[1:] == [
        '&lt;img src=x onerror="alert(2)"&gt;', MASKED, "Imobiliário",
        "&lt;script&gt;alert(1)&lt;/script&gt;", "Chamada", "sem CRM",
    ]  # fmt: skip
    assert "CRM não configurado" in visible and "/admin/leads.csv" in visible
