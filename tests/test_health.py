import asyncio
import os
import sys
import time

import aiohttp

from tests.conftest import free_port


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_health_with_credentials_reports_real_backends_and_no_simulator(gateway):
    status, body = await get_json(f"{gateway.url}/health")
    assert status == 200
    assert body["status"] == "ok" and body["store"]["reachable"] is True
    assert body["realtime"]["backend"] == "openai"
    assert body["realtime"]["voice"] == "cedar"  # the persona's, with REALTIME_VOICE unset
    assert body["twilio"] == {"configured": True, "backend": "twilio"}
    assert body["sandbox"] is False and body["version"]
    assert gateway.runtime.realtime_sim is None and gateway.runtime.twilio_sim is None


async def test_health_in_sandbox_says_simulators_are_in_use(start_gateway):
    gw = await start_gateway({})
    status, body = await get_json(f"{gw.url}/health")
    assert status == 200
    assert body["sandbox"] is True
    assert body["realtime"]["backend"] == "simulator"
    assert body["twilio"] == {"configured": False, "backend": "simulator"}
    assert body["voice"] == {"provider": "openai", "backend": "simulator"}
    assert body["model"] == {"backend": "realtime", "name": "gpt-realtime-2.1"}


async def test_the_sandbox_answers_a_call_on_gpt_live_when_it_is_chosen(start_gateway):
    from simulators.caller import SimulatedCaller
    from simulators.speech import speech_mulaw

    gw = await start_gateway({"VOICE_BACKEND": "live"})
    status, body = await get_json(f"{gw.url}/health")
    assert status == 200 and body["sandbox"] is True
    assert body["model"] == {"backend": "live", "name": "gpt-live-1.1"}
    rt = gw.runtime
    token = rt.twilio_auth_token
    async with SimulatedCaller(gw.url, gw.url, token, rt.twilio_account_sid) as caller:
        assert (await caller.dial()).status == 200
        await caller.connect()
        await caller.wait_until(lambda: caller.audio_received, 10)  # greeted, by Live
        await caller.wait_playback_idle(quiet_s=0.3, timeout=30)
        turn = await caller.speak_and_wait(speech_mulaw(900, seed=1))
        assert turn.latency_s is not None and caller.violations == []
    [session] = rt.realtime_sim.live.sessions
    assert session.errors == [] and rt.realtime_sim.sessions == []


async def test_the_sandbox_simulates_elevenlabs_when_it_is_chosen(start_gateway):
    gw = await start_gateway({"VOICE_PROVIDER": "elevenlabs"})
    status, body = await get_json(f"{gw.url}/health")
    assert status == 200 and body["sandbox"] is True
    assert body["voice"] == {
        "provider": "elevenlabs",
        "backend": "simulator",
        "model": "eleven_flash_v2_5",
    }
    # The sandbox's voice answers the gateway's own client (any key, the sandbox voice id).
    spoken = bytearray()
    result = await gw.runtime.elevenlabs.speak_pcm24k("Olá, tudo bem?", spoken.extend)
    assert result.characters == len("Olá, tudo bem?") and len(spoken) == result.pcm_bytes > 0


async def test_health_is_503_when_the_store_is_unreachable(gateway):
    await gateway.runtime.store.close()  # the database connection is gone
    status, body = await get_json(f"{gateway.url}/health")
    assert status == 503
    assert body["status"] == "degraded" and body["store"]["reachable"] is False


async def test_python_m_gateway_serves_health_in_sandbox_within_10_s(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TWILIO_"))}
    env.update(PORT=str(port), HOST="127.0.0.1", DATABASE_URL=f"sqlite:///{tmp_path}/g.db")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        body = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and body is None:
            try:
                status, body = await get_json(f"http://127.0.0.1:{port}/health")
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        assert body is not None, "no /health answer within 10 s"
        assert status == 200 and body["sandbox"] is True
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    stderr = err.decode()
    assert "SANDBOX MODE" in stderr and "SIMULATOR" in stderr
    assert "make call" in stderr and "make whatsapp" in stderr
