"""Issue #17 at the engine: one request's failure stays its own, and a stream whose reader
stops reading cannot make the engine's memory grow."""

from __future__ import annotations

import asyncio
import gc

import pytest

from mistralpy.engine.engine import AsyncEngine
from mistralpy.params import InvalidParameter, SamplingParams
from tests.engine.fakes import VOCAB, FakeTokenizer
from tests.engine.test_engine_fake import make_engine, prompt, run

POISON = 77  # a token id the monkeypatched runner refuses, as an out-of-range id would


def _poisoned(engine, monkeypatch) -> None:
    """Make every forward that contains POISON raise, as the embedding does for a bad id."""
    real = engine.runner.execute

    def execute(batch):
        if any(POISON in w.token_ids for w in batch.seqs):
            raise IndexError("index out of range in self")
        return real(batch)

    monkeypatch.setattr(engine.runner, "execute", execute)


def test_failing_request_does_not_fail_its_step_mates(monkeypatch):
    params = SamplingParams(max_tokens=6, temperature=0)
    alone = run(make_engine(), [("good", prompt(range(20, 30)), params, 0)])["good"]
    engine = make_engine()
    _poisoned(engine, monkeypatch)
    final = run(
        engine,
        [
            ("good", prompt(range(20, 30)), params, 0),
            ("bad", prompt([20, 21, POISON, 22]), params, 0),
            ("good2", prompt(range(30, 40)), SamplingParams(max_tokens=4, seed=3), 0),
        ],
    )
    assert final["bad"].error and final["bad"].finished
    assert final["good"].error is None
    assert final["good"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert final["good2"].error is None and len(final["good2"].outputs[0].token_ids) == 4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("ids", [[20, VOCAB], [20, 2**63], [20, -1]])
def test_prompt_token_ids_outside_the_vocab_are_refused_at_add(ids):
    engine = make_engine()
    with pytest.raises(InvalidParameter) as info:
        engine.add_request("x", prompt(ids), SamplingParams(max_tokens=2))
    assert info.value.param == "prompt"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seed_outside_int64_is_refused(seed):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(seed=seed)
    assert info.value.param == "seed"


def test_int64_edge_seeds_sample(monkeypatch):
    engine = make_engine()
    reqs = [
        (f"s{i}", prompt(range(20, 26)), SamplingParams(max_tokens=3, seed=seed, n=2), 0)
        for i, seed in enumerate([2**63 - 1, -(2**63)])
    ]
    final = run(engine, reqs)
    assert all(out.error is None for out in final.values())


def test_async_engine_isolates_a_failing_request(monkeypatch):
    engine = make_engine()
    _poisoned(engine, monkeypatch)
    params = SamplingParams(max_tokens=5, temperature=0)

    async def go():
        aeng = AsyncEngine(engine)
        try:

            async def collect(rid, ids):
                outs = [o async for o in aeng.generate(rid, prompt(ids), params)]
                return outs[-1]

            results = await asyncio.gather(
                collect("good", range(20, 30)),
                collect("bad", [20, POISON]),
                return_exceptions=True,
            )
        finally:
            aeng.shutdown()
        return results

    good, bad = asyncio.run(go())
    assert isinstance(bad, RuntimeError)
    assert not isinstance(good, BaseException)
    assert good.finished and good.outputs[0].finish_reason == "length"


def _stalled_reader(max_unread: int, max_tokens: int):
    """Read the first output of a request with top-20 logprobs, then stop reading while the
    engine runs on. Returns (long lists that appeared while stalled, the reader's next item,
    whether the engine still runs the request, the tokens the first output carried)."""

    engine = make_engine(max_model_len=max_tokens + 64, num_blocks=max_tokens // 4 + 64)
    params = SamplingParams(
        max_tokens=max_tokens, logprobs=True, top_logprobs=20, seed=1, ignore_eos=True
    )

    async def go():
        aeng = AsyncEngine(engine, max_unread_outputs=max_unread)
        try:
            outputs = aeng.generate("slow", prompt(range(20, 30)), params)
            first = await outputs.__anext__()  # may carry a few steps, merged
            before = _long_lists()
            deadline = asyncio.get_running_loop().time() + 20
            while (
                engine.stats.num_generated_tokens < max_tokens and engine.has_unfinished_requests()
            ):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            grown = _long_lists() - before
            running = engine.has_unfinished_requests()
            try:
                nxt = await outputs.__anext__()
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                nxt = exc
            await outputs.aclose()
            return grown, nxt, running, len(first.outputs[0].token_ids)
        finally:
            aeng.shutdown()

    return asyncio.run(go())


def _long_lists() -> int:
    """Lists of 100+ items alive now: a queued cumulative copy of a reply is one of them."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is list and len(o) >= 100)


def test_stalled_reader_costs_one_merged_output():
    """Item 2: unread outputs were queued one per step, each a copy of the cumulative
    token/logprob lists: memory grew quadratically with the length of the reply."""
    grown, nxt, _, first = _stalled_reader(max_unread=10_000, max_tokens=600)
    # before the fix: ~2 per unread output (its token ids and logprobs, copied whole), ~1000
    assert grown < 100, f"{grown} reply-sized lists held for a stalled reader"  # 3 here
    out = nxt.outputs[0]
    assert out.finish_reason == "length" and len(out.delta_token_ids) == 600 - first
    assert out.token_ids[first:] == out.delta_token_ids
    assert len(out.logprobs) == 600
    assert out.delta_text == FakeTokenizer().decode(out.delta_token_ids)


def test_reader_far_behind_is_cut_off_and_its_request_aborted():
    from mistralpy.engine.errors import ReaderTooSlowError

    _, nxt, running, _ = _stalled_reader(max_unread=40, max_tokens=400)
    assert isinstance(nxt, ReaderTooSlowError)
    assert not running


def _output(ids: list[int], finished: bool = False):
    from mistralpy.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput

    text = "".join(f"w{i} " for i in ids)
    comp = CompletionOutput(0, ids, text, text[-4:], ids[-1:], None, None, None)
    return RequestOutput("r", [1], [comp], finished, RequestMetrics(0.0))


def test_output_stream_merges_unread_outputs():
    from mistralpy.engine.stream import OutputStream

    overruns = []
    stream = OutputStream(max_unread=3, on_overrun=lambda: overruns.append(1))

    async def go():
        stream.put(_output([21]))
        first = await stream.get()
        for n in range(2, 4):
            stream.put(_output(list(range(21, 21 + n))))
        merged = await stream.get()
        return first, merged

    first, merged = asyncio.run(go())
    assert first.outputs[0].delta_token_ids == [21]
    assert merged.outputs[0].delta_token_ids == [22, 23]
    assert merged.outputs[0].delta_text == "w22 w23 " and merged.outputs[0].token_ids[-1] == 23
    for n in range(4):  # a fourth unread output overruns the bound of 3
        stream.put(_output([21] * (n + 1)))
    assert overruns == [1]


def _wide_schema(n: int) -> dict:
    props = {f"field_{i}": {"type": "integer"} for i in range(n)}
    return {"type": "object", "properties": props, "required": ["field_0"]}


@pytest.mark.slow  # ~20 s: loads the demo model, compiles a 1,500-property schema twice
def test_grammar_compiles_off_the_engine_thread():
    """Item 10: a grammar compiled on the engine thread paused every running stream (2.9 s
    for a 10,000-property schema, ~5.8 s more for the first grammar's tokenizer build)."""
    import time

    from mistralpy.api.runner import load_engine
    from mistralpy.engine.config import EngineConfig
    from mistralpy.params import GrammarSpec

    config = EngineConfig(model="demo", device="cpu", max_model_len=1024, num_kv_blocks=256)
    engine = load_engine(config)  # as the server starts: the grammar tokenizer is built here
    plain = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    spec = GrammarSpec("json_schema", _wide_schema(1500))
    constrained = SamplingParams(max_tokens=4, grammar=spec, n=4)  # one build for 4 sequences

    async def go():
        aeng = AsyncEngine(engine)
        try:
            gaps, last = [], None
            stream = aeng.generate("plain", prompt([1, 1000, 1001]), plain)
            await stream.__anext__()  # running now
            t0 = time.monotonic()
            first = asyncio.ensure_future(
                _last(aeng.generate("g1", prompt([1, 1002]), constrained))
            )
            async for _ in stream:
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if first.done():
                    break
            await stream.aclose()
            compiled_in = time.monotonic() - t0
            await first
            t1 = time.monotonic()
            again = await _last(aeng.generate("g2", prompt([1, 1003]), constrained))
            return max(gaps), compiled_in, time.monotonic() - t1, again
        finally:
            aeng.shutdown()

    worst_gap, compiled_in, second, again = asyncio.run(go())
    assert again.outputs[0].finish_reason in ("stop", "length")
    assert worst_gap < 0.5, (
        f"a running stream paused {worst_gap:.2f} s (compile {compiled_in:.2f} s)"
    )
    assert second < compiled_in  # the second request with the same schema hits the cache


async def _last(outputs):
    last = None
    async for out in outputs:
        last = out
    return last
