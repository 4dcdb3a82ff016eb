import asyncio

import openai
import pytest
from openai import AsyncOpenAI


async def test_the_sdk_gets_a_parsed_response_from_the_simulator(realtime_sim):
    client = AsyncOpenAI(api_key="sk-test", base_url=realtime_sim.base_url, max_retries=0)
    try:
        response = await client.responses.create(
            model="gpt-5.4-mini",
            instructions="Resuma",
            input="Cliente: tenho uma imobiliária em Ribeirão Preto",
        )
    finally:
        await client.close()
    assert "imobiliária em Ribeirão Preto" in response.output_text
    assert response.usage.total_tokens > 0
    [request] = realtime_sim.responses.requests
    assert request.body["model"] == "gpt-5.4-mini" and request.status == 200


async def test_injected_failures_reach_the_sdk_as_server_errors(realtime_sim):
    realtime_sim.responses.fail_next(1, status=500)
    client = AsyncOpenAI(api_key="sk-test", base_url=realtime_sim.base_url, max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError):
            await client.responses.create(model="gpt-5.4-mini", input="x")
        ok = await client.responses.create(model="gpt-5.4-mini", input="y")
    finally:
        await client.close()
    assert ok.output_text
    assert [r.status for r in realtime_sim.responses.requests] == [500, 200]


async def test_a_client_that_leaves_mid_body_is_no_server_error(realtime_sim):
    """A gateway shutting down mid-request (seen once in a PostgreSQL suite run) must not
    make the simulator log a traceback; the autouse log check fails this test if it does."""
    _reader, writer = await asyncio.open_connection(realtime_sim.host, realtime_sim.port)
    head = (
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
        "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    )
    writer.write(head.encode() + b'{"model": "gpt-5.4-mini", "inp')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.2)  # the server reads the rest, finds the connection gone
    assert realtime_sim.responses.requests == []
