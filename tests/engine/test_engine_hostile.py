"""Issue #17 at the engine: one request's failure stays its own, and a stream whose reader
stops reading cannot make the engine's memory grow."""

from __future__ import annotations

import asyncio

import pytest

from mistralpy.engine.engine import AsyncEngine
from mistralpy.params import InvalidParameter, SamplingParams
from tests.engine.fakes import VOCAB
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
