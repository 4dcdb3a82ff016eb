import asyncio
import logging

import pytest

from gateway import background


async def test_a_running_loop_is_cancelled_and_awaited_when_the_body_ends():
    ended = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    async with background.running("forever", loop()):
        await asyncio.sleep(0)
        assert any(t.get_name() == "forever" for t in asyncio.all_tasks())
    assert ended.is_set()


@pytest.mark.allow_tracebacks
async def test_a_crash_is_logged_once_with_the_task_name_and_stop_does_not_raise(caplog):
    async def crash() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="gateway.background"):
        task = background.start("crasher", crash())
        await asyncio.wait([task])
        await asyncio.sleep(0)  # done callbacks run on the next loop turn
        await background.stop(task, None)
    [record] = caplog.records
    assert "crasher" in record.getMessage() and record.exc_info[1].args == ("boom",)
