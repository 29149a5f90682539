"""AsyncEngine: concurrent streams, abort on early exit, errors surfaced, engine survives."""

import asyncio

import pytest

from engine import InvalidParameter, SamplingParams
from engine.async_engine import AsyncEngine


@pytest.fixture
def async_engine(make_llm):
    llm = make_llm("llama")
    eng = AsyncEngine(llm.engine)
    yield eng
    eng.shutdown()


def test_concurrent_streams_match_offline(async_engine, make_llm):
    prompts = ["one two three", "the cat sat on the mat", "x"]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def run(p):
        outs = [o async for o in async_engine.generate(p, sp)]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens) and len(outs) > 1  # incremental
        return outs[-1].outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(run(p) for p in prompts))

    got = asyncio.run(main())
    offline = make_llm("llama").generate(prompts, sp)
    assert got == [o.outputs[0].token_ids for o in offline]


def test_leaving_early_aborts_and_frees_blocks(async_engine):
    eng = async_engine.engine
    sp = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        agen = async_engine.generate("abort me " * 10, sp, request_id="x")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 5:
                break
        await agen.aclose()

    asyncio.run(main())
    assert async_engine.call(lambda e: (len(e.requests), e.kv.pool.num_free_blocks)) == (
        0, eng.kv.pool.num_blocks)


def test_cancelled_task_aborts(async_engine):
    sp = SamplingParams(temperature=0, max_tokens=800, ignore_eos=True)

    async def consume():
        async for _ in async_engine.generate("cancel me", sp):
            pass

    async def main():
        task = asyncio.create_task(consume())
        while async_engine.call(lambda e: e.kv.pool.num_used_blocks) == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert async_engine.call(lambda e: e.kv.pool.num_used_blocks) == 0


def test_bad_params_raise_in_caller_and_step_errors_do_not_kill(async_engine):
    async def main():
        with pytest.raises(InvalidParameter):
            async for _ in async_engine.generate(prompt_token_ids=[10**7], params=SamplingParams()):
                pass
        # Make exactly one forward pass fail: the request in it gets the error...
        runner = async_engine.engine.runner
        real = runner.execute
        calls = {"n": 0}

        def flaky(sched):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated device fault")
            return real(sched)

        runner.execute = flaky
        with pytest.raises(RuntimeError, match="simulated device fault"):
            async for _ in async_engine.generate("boom", SamplingParams(max_tokens=5)):
                pass
        # ...and the engine keeps serving.
        outs = [o async for o in async_engine.generate("still alive", SamplingParams(
            temperature=0, max_tokens=5, ignore_eos=True))]
        assert len(outs[-1].outputs[0].token_ids) == 5

    asyncio.run(main())
    assert async_engine.is_alive
