"""AsyncEngine: concurrent streams, abort, per-request failure, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from mistralpy.engine.engine import AsyncEngine
from mistralpy.engine.errors import EngineDeadError, PromptTooLongError, RequestFailedError
from mistralpy.params import SamplingParams
from tests.engine.test_engine_fake import make_engine, prompt, run


@pytest.fixture
def engine():
    eng = AsyncEngine(make_engine(budget=16, max_model_len=64))
    yield eng
    eng.shutdown()


async def collect(eng, rid, p, params):
    outs = [out async for out in eng.generate(rid, p, params)]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs


def test_concurrent_streams_match_the_sync_engine(engine):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = {f"r{i}": prompt(range(20 + i, 40 + 2 * i)) for i in range(4)}

    async def main():
        return await asyncio.gather(
            *(collect(engine, rid, p, params) for rid, p in prompts.items())
        )

    results = asyncio.run(main())
    want = run(make_engine(), [(rid, p, params, 0) for rid, p in prompts.items()])
    for rid, outs in zip(prompts, results):
        assert outs[-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
        assert "".join(o.outputs[0].delta_text for o in outs) == want[rid].outputs[0].text


def test_closing_the_stream_aborts_and_frees(engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def main():
        stream = engine.generate("a", prompt(range(20, 30)), params)
        await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not engine.engine.has_unfinished_requests():
                break

    asyncio.run(main())
    bm = engine.engine.block_manager
    assert not engine.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_ends_the_stream_with_abort(engine):
    params = SamplingParams(max_tokens=50, ignore_eos=True)

    async def main():
        outs = []
        async for out in engine.generate("a", prompt(range(20, 30)), params):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("a")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 50


def test_user_error_raises_from_generate(engine):
    async def main():
        async for _ in engine.generate("a", prompt(range(100)), SamplingParams()):
            pass

    with pytest.raises(PromptTooLongError):
        asyncio.run(main())


def test_one_failing_request_does_not_disturb_others(engine, monkeypatch):
    inner = engine.engine
    real = inner._on_token

    def flaky(state, token):
        if state.request.request_id == "bad":
            raise RuntimeError("detokenizer exploded")
        return real(state, token)

    monkeypatch.setattr(inner, "_on_token", flaky)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    async def main():
        return await asyncio.gather(
            collect(engine, "good", prompt(range(20, 30)), params),
            collect(engine, "bad", prompt(range(30, 40)), params),
            return_exceptions=True,
        )

    good, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and "exploded" in str(bad)
    assert len(good[-1].outputs[0].token_ids) == 5


def test_shutdown_fails_pending_and_new_requests():
    eng = AsyncEngine(make_engine(max_model_len=64))
    params = SamplingParams(max_tokens=60, ignore_eos=True)

    async def main():
        stream = eng.generate("a", prompt(range(20, 24)), params)
        await stream.__anext__()
        eng.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate("b", prompt([20]), params):
                pass

    asyncio.run(main())
    assert not eng.is_running


def test_a_dead_runner_stops_the_engine_with_its_reason():
    """A runner that can never step again (a dead tensor-parallel rank) ends the loop: the
    request in flight and every later one fail with EngineDeadError carrying the reason."""
    from mistralpy.runner.errors import RunnerDeadError

    eng = AsyncEngine(make_engine(budget=16, max_model_len=64))
    real = eng.engine.runner.execute
    calls = []

    def execute(batch):
        calls.append(batch)
        if len(calls) > 2:  # a few tokens out, then the worker "dies"
            raise RunnerDeadError("tensor-parallel worker rank 1 failed (killed by SIGKILL)")
        return real(batch)

    eng.engine.runner.execute = execute
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def main():
        got = []
        with pytest.raises(EngineDeadError, match="runner died: .*rank 1 failed") as info:
            async for out in eng.generate("a", prompt(range(20, 30)), params):
                got.append(out)
        assert not any(o.finished for o in got)  # (its outputs may be merged with the error)
        with pytest.raises(EngineDeadError):
            await collect(eng, "b", prompt(range(20, 25)), params)
        return info.value

    try:
        err = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        eng.shutdown()
    assert eng.failure is err and not eng.is_running
    assert len(calls) == 3  # no request-by-request retry of a dead runner


def test_an_idle_engine_notices_a_dead_runner():
    """A tensor-parallel worker that dies between requests stops the loop too (the server
    watches `is_running` and exits), without waiting for a request to fail on it."""
    import time

    from mistralpy.runner.errors import RunnerDeadError

    eng = AsyncEngine(make_engine(max_model_len=64))
    reason = "tensor-parallel worker rank 1 failed (killed by SIGKILL)"

    def check_alive():
        raise RunnerDeadError(reason)

    try:
        eng.engine.runner.check_alive = check_alive
        deadline = time.monotonic() + 10
        while eng.is_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not eng.is_running
        assert eng.failure is not None and reason in str(eng.failure)
    finally:
        eng.shutdown()
