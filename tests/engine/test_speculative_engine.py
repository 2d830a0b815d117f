"""Speculative decoding in the engine, on a fresh random tiny checkpoint.

Oracle: the same engine's plain greedy decoding. A greedy request decoded speculatively must
emit exactly the plain greedy tokens (the verify step only changes how many tokens one forward
yields), whatever the drafts, batching, prefix caching, n, max_tokens, stops or grammar.
Random weights accept nothing by chance, so most tests draft with `OracleDrafter`: the plain
greedy continuation, each token corrupted with probability 1 - alpha.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch

from mistralpy.api.chat import final_usage
from mistralpy.engine.config import EngineConfig
from mistralpy.engine.engine import LLMEngine
from mistralpy.engine.speculative import NgramDrafter, OracleDrafter, Speculation
from mistralpy.params import GrammarSpec, SamplingParams
from mistralpy.runner.batch import SampleSpec, ScheduledBatch, SeqWork
from mistralpy.testing import tiny_checkpoint
from tests.engine.test_engine_tiny import make_engine as tiny_engine
from tests.rerun_graphs import attach_graphs

BOS = 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint.write_checkpoint(
        tmp_path_factory.mktemp("tiny"), seed=random.randrange(1 << 30)
    )


@pytest.fixture(scope="module")
def loaded(ckpt):
    engine = LLMEngine.from_config(EngineConfig(model=str(ckpt), device="cpu", dtype="float32"))
    return engine.runner.model, engine.tokenizer


def make_engine(ckpt, loaded, **overrides):
    overrides = {"max_model_len": 256, "num_kv_blocks": 96, **overrides}
    engine = tiny_engine(ckpt, loaded, **overrides)
    engine.model_path = ckpt  # grammars build their tokenizer from it
    return engine


def prompt_of(rng, n):
    return SimpleNamespace(
        token_ids=[BOS] + [rng.randrange(1000, 131072) for _ in range(n)], images=[]
    )


def run(engine, requests):
    """requests: (prompt, params, speculation | None); final outputs in order."""
    ids = [f"r{i}" for i in range(len(requests))]
    for rid, (prompt, params, spec) in zip(ids, requests):
        engine.add_request(rid, prompt, params, speculation=spec)
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return [final[rid] for rid in ids]


def oracle(prompt, continuation, alpha, k=4, seed=0):
    drafter = OracleDrafter(len(prompt.token_ids), continuation, alpha, 131072, seed)
    return Speculation(drafter, k)


def assert_no_leak(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.tables


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_speculative_equals_plain_greedy(ckpt, loaded, prefix_caching):
    """A batch of mixed requests (plain, oracle drafts at several alpha and k, n-gram, n=2)
    emits the plain greedy tokens; with alpha 1 drafts are all accepted."""
    rng = random.Random()
    plain_engine = make_engine(ckpt, loaded, enable_prefix_caching=prefix_caching)
    shared = prompt_of(rng, 20).token_ids
    prompts = [
        SimpleNamespace(token_ids=shared + prompt_of(rng, 3 + i).token_ids[1:], images=[])
        for i in range(5)
    ]
    repeat = SimpleNamespace(token_ids=[BOS] + [7000, 7001, 7002, 7003] * 8, images=[])
    prompts.append(repeat)
    n2 = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, n=2)
    plain = run(plain_engine, [(p, GREEDY, None) for p in prompts] + [(prompts[0], n2, None)])
    truth = [o.outputs[0].token_ids for o in plain]
    engine = make_engine(ckpt, loaded, enable_prefix_caching=prefix_caching)
    specs = [
        None,
        oracle(prompts[1], truth[1], 1.0, k=4),
        oracle(prompts[2], truth[2], 0.7, k=2),
        oracle(prompts[3], truth[3], 0.5, k=6),
        oracle(prompts[4], truth[4], 0.0, k=3),
        Speculation(NgramDrafter(3, 1), 4),
        oracle(prompts[0], truth[0], 0.9, k=3),
    ]
    requests = [(p, GREEDY, s) for p, s in zip(prompts, specs)] + [(prompts[0], n2, specs[-1])]
    outs = run(engine, requests)
    for got, want in zip(outs, plain):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.text for c in got.outputs] == [c.text for c in want.outputs]
    m = outs[1].metrics  # alpha 1: every draft accepted, ~5 tokens a step
    assert m.num_accepted_tokens == m.num_draft_tokens > 0
    assert final_usage(outs[1])["speculative"]["acceptance_rate"] == 1.0
    assert "speculative" not in final_usage(outs[0])
    # a drafter that is always wrong never earns a verify step: its guesses are checked
    # against plain steps' tokens (`shadow_checking`)
    assert outs[4].metrics.num_drafts == 0
    assert outs[0].metrics.num_draft_tokens == 0
    assert engine.stats.num_accepted_tokens > 0
    assert_no_leak(engine)


def test_max_tokens_stops_and_logprobs(ckpt, loaded):
    """Never past max_tokens or a stop token inside accepted drafts; a log-prob per token,
    equal to plain decoding's."""
    rng = random.Random()
    prompt = prompt_of(rng, 12)
    params = SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    (plain,) = run(make_engine(ckpt, loaded), [(prompt, params, None)])
    truth = plain.outputs[0].token_ids
    engine = make_engine(ckpt, loaded)
    for max_tokens in (1, 2, 5, 7):
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        (out,) = run(engine, [(prompt, p, oracle(prompt, truth, 1.0, k=6))])
        assert out.outputs[0].token_ids == truth[:max_tokens]
        assert out.outputs[0].finish_reason == "length"
    stop = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[truth[6]])
    (out,) = run(engine, [(prompt, stop, oracle(prompt, truth, 1.0, k=4))])
    cut = truth.index(truth[6]) + 1
    assert out.outputs[0].token_ids == truth[:cut] and out.outputs[0].finish_reason == "stop"
    stop_text = plain.outputs[0].text[len(plain.outputs[0].text) // 2 :][:3]
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop_text])
    (ref,) = run(engine, [(prompt, p, None)])
    (out,) = run(engine, [(prompt, p, oracle(prompt, truth, 1.0, k=4))])
    assert out.outputs[0].text == ref.outputs[0].text and out.outputs[0].finish_reason == "stop"
    (out,) = run(engine, [(prompt, params, oracle(prompt, truth, 0.7, k=4))])
    assert out.outputs[0].token_ids == truth
    got, want = out.outputs[0].logprobs, plain.outputs[0].logprobs
    assert len(got) == len(want) == len(truth)
    for a, b in zip(got, want):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
    assert_no_leak(engine)


def test_grammar_rejects_forbidden_drafts_and_rolls_back(ckpt, loaded):
    """Under a regex, greedy speculative output equals plain greedy output although most
    corrupted drafts are forbidden; sampled output still matches the regex."""
    rng = random.Random()
    engine = make_engine(ckpt, loaded)
    pattern = r"[0-9]{3}-[a-c]{2}-[0-9]{4}"
    grammar = GrammarSpec("regex", pattern)
    prompt = prompt_of(rng, 6)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, grammar=grammar)
    (plain,) = run(engine, [(prompt, greedy, None)])
    truth = plain.outputs[0].token_ids
    for alpha in (1.0, 0.6):
        (out,) = run(engine, [(prompt, greedy, oracle(prompt, truth, alpha, k=4, seed=3))])
        assert out.outputs[0].token_ids == truth
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=5, grammar=grammar)
    drafter = Speculation(NgramDrafter(2, 1), 3)
    outs = run(engine, [(prompt_of(rng, 6), sampled, drafter) for _ in range(3)])
    for out in outs:
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
    assert_no_leak(engine)


def test_seeded_sampling_with_drafts_is_reproducible(ckpt, loaded):
    """Sampling with drafts: same seed, same tokens; every token counted once."""
    prompt = SimpleNamespace(token_ids=[BOS] + [9000, 9001, 9002] * 10, images=[])
    params = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, seed=11, ignore_eos=True)
    spec = Speculation(NgramDrafter(3, 1), 4)
    first = run(make_engine(ckpt, loaded), [(prompt, params, spec)])[0]
    second = run(make_engine(ckpt, loaded), [(prompt, params, spec)])[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert len(first.outputs[0].token_ids) == 16


# ------------------------------------------------------------- verify steps through the graphs


def graph_engine(ckpt, loaded, **overrides):
    """An engine whose runner decodes and verifies through CPU stand-in decode graphs
    (`tests.rerun_graphs`: each replay reruns the forward over the loaded graph rows)."""
    engine = make_engine(ckpt, loaded, enforce_eager=True, **overrides)
    runner = engine.runner
    width = -(-engine.config.max_model_len // runner.cfg.block_size)
    return engine, attach_graphs(runner, runner.model, width)


def spy_verify_logits(runner) -> list:
    """The logits each `_verify_step` of `runner` receives, recorded as they pass."""
    seen = []
    inner = runner._verify_step

    def spy(logits, *args):
        seen.append(logits.clone())
        return inner(logits, *args)

    runner._verify_step = spy
    return seen


def test_graph_verify_rows_give_the_eager_verify_logits(ckpt, loaded):
    """A mixed step (a plain sequence, two verifying 3 and 1 drafts) through the decode
    graphs' rows gives the eager verify forward's logits and the same tokens."""
    rng = random.Random()
    eager = make_engine(ckpt, loaded, enforce_eager=True).runner
    graphed, graphs = graph_engine(ckpt, loaded)
    graphed = graphed.runner
    prompts = [prompt_of(rng, 5 + 7 * i).token_ids for i in range(3)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]  # 48 slots each
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def step(seqs):
        outs = [r.execute(ScheduledBatch(seqs)) for r in (eager, graphed)]
        assert outs[0] == outs[1]
        return outs[0]

    prefill = step([
        SeqWork(f"s{i}", p, 0, t, [], SampleSpec(greedy, p, [], None))
        for i, (p, t) in enumerate(zip(prompts, tables))
    ])  # fmt: skip
    first = [prefill.sampled[f"s{i}"].token_id for i in range(3)]
    seen = [spy_verify_logits(r) for r in (eager, graphed)]
    drafts = [[], [rng.randrange(1000, 131072) for _ in range(3)], [first[2]]]
    out = step([
        SeqWork(f"s{i}", [first[i], *d], len(p), t, [],
                SampleSpec(greedy, p, [first[i]], None, draft_ids=d, speculative=True))
        for i, (p, t, d) in enumerate(zip(prompts, tables, drafts))
    ])  # fmt: skip
    assert graphed.graph_verify_steps == 1 and eager.graph_verify_steps == 0
    assert graphs.replays == 1 and set(out.accepted) == {"s1", "s2"}
    want, got = seen[0][0], seen[1][0]
    assert want.shape == got.shape == (1 + 4 + 2, eager.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_graphable_needs_rows_in_a_bucket_and_positions_in_the_table(ckpt, loaded):
    engine, graphs = graph_engine(ckpt, loaded, max_num_seqs=4)
    runner = engine.runner
    greedy = SamplingParams(max_tokens=16, temperature=0.0)

    def work(n_drafts, table, n_tokens=None):
        spec = SampleSpec(greedy, [1], [], None, draft_ids=[5] * n_drafts, speculative=True)
        return SeqWork("s", [5] * (n_tokens or 1 + n_drafts), 20, table, [], spec)

    def graphable(*seqs):
        return runner._graphable(ScheduledBatch(list(seqs)))

    assert graphable(work(3, [0, 1]))  # 4 rows at positions 20..23 in blocks 0, 1
    assert not graphable(work(2, [0, 1]), work(0, [4, 5]), work(0, [6, 7]))  # 5 rows > 4
    assert not graphable(work(2, [0]))  # position 20 is past the table's 16 slots
    assert not graphable(work(3, [0, 1], n_tokens=5))  # a token that does not sample
    assert not graphable(work(0, list(range(graphs.width + 1))))  # wider than the graphs


def test_greedy_speculative_through_graphs_equals_plain_greedy(ckpt, loaded):
    """With the decode graphs, verify steps of mixed batches run as graph rows (those over
    the largest bucket eagerly) and emit the plain greedy tokens and log-probs."""
    rng = random.Random()
    prompts = [prompt_of(rng, 8 + 3 * i) for i in range(4)]
    prompts.append(SimpleNamespace(token_ids=[BOS] + [7000, 7001, 7002, 7003] * 6, images=[]))
    params = SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    plain = run(make_engine(ckpt, loaded), [(p, params, None) for p in prompts])
    truth = [o.outputs[0].token_ids for o in plain]
    engine, graphs = graph_engine(ckpt, loaded, max_num_seqs=8)
    specs = [
        None,
        oracle(prompts[1], truth[1], 1.0, k=4),
        oracle(prompts[2], truth[2], 0.7, k=2),
        oracle(prompts[3], truth[3], 0.0, k=3),
        Speculation(NgramDrafter(3, 1), 4),
    ]
    outs = run(engine, [(p, params, s) for p, s in zip(prompts, specs)])
    for got, want in zip(outs, plain):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
    assert outs[1].metrics.num_accepted_tokens == outs[1].metrics.num_draft_tokens > 0
    assert engine.runner.graph_verify_steps > 0 and graphs.replays > 0
    assert_no_leak(engine)


def test_a_paused_sequence_may_launch_its_next_plain_step_ahead(ckpt, loaded):
    """After drafts keep missing, the sequence pauses drafting (`draft_pause`): a plain step's
    work says whether the next step drafts (`speculative`, which keeps the runner from
    launching it ahead) exactly when that next step is a verify step (a verify step's result
    is not known when its work is built, and verify steps never launch ahead); with
    max_pause 0 every step verifies."""
    rng = random.Random(7)
    prompt = prompt_of(rng, 12)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    (plain,) = run(make_engine(ckpt, loaded), [(prompt, params, None)])
    truth = plain.outputs[0].token_ids
    for max_pause, want_plain_steps in ((63, True), (0, False)):
        engine = make_engine(ckpt, loaded)
        seen = []
        execute = engine.runner.execute

        def spy(batch, execute=execute, seen=seen):
            seen.extend((len(s.token_ids), s.sample.speculative) for s in batch.seqs if s.sample)
            return execute(batch)

        engine.runner.execute = spy
        drafter = OracleDrafter(len(prompt.token_ids), truth, 0.0, 131072, 0)  # all wrong
        (out,) = run(engine, [(prompt, params, Speculation(drafter, 3, max_pause=max_pause))])
        assert out.outputs[0].token_ids == truth
        decode = seen[1:]  # after the prefill step
        rows = [n for n, _ in decode]
        # a plain step's flag says whether step i + 1 verifies drafts (more than one row)
        for (n, flag), next_rows in zip(decode, rows[1:]):
            if n == 1:
                assert flag == (next_rows > 1), (decode, max_pause)
        # (the last steps draft fewer, then none: max_tokens leaves no room)
        assert any(n == 1 for n in rows[:8]) == want_plain_steps, rows


def test_a_drafter_earns_verify_steps_by_a_checked_guess(ckpt, loaded):
    """With the pause policy on, a new sequence's drafter is first checked on a plain step
    (its first token against the sampled one); a hit makes the step after next a verify
    step (the next one may already run, launched ahead), and every plain step's
    `speculative` flag says whether the step after it verifies."""
    rng = random.Random(5)
    prompt = prompt_of(rng, 12)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    (plain,) = run(make_engine(ckpt, loaded), [(prompt, params, None)])
    truth = plain.outputs[0].token_ids
    engine = make_engine(ckpt, loaded)
    seen = []
    execute = engine.runner.execute

    def spy(batch):
        seen.extend((len(s.token_ids), s.sample.speculative) for s in batch.seqs if s.sample)
        return execute(batch)

    engine.runner.execute = spy
    drafter = OracleDrafter(len(prompt.token_ids), truth, 1.0, 131072, 0)  # always right
    (out,) = run(engine, [(prompt, params, Speculation(drafter, 3))])
    assert out.outputs[0].token_ids == truth
    rows = [n for n, _ in seen[1:]]  # after the prefill step (which samples the first token)
    assert rows[:3] == [1, 1, 4], rows  # checked, launched-ahead plain step, then verify
    for (n, flag), next_rows in zip(seen[1:], rows[1:]):
        if n == 1:
            assert flag == (next_rows > 1), seen
    assert out.metrics.num_accepted_tokens == out.metrics.num_draft_tokens > 0


def test_a_drafter_that_finds_nothing_backs_off(ckpt, loaded):
    """Prompt lookup on text that never repeats proposes nothing: after empty proposals the
    drafter pauses 1, 3, 7, 7, ... steps (`MAX_DRAFT_PAUSE`), so over 58 steps it is asked
    14 times at most, not every step (each ask scans the whole sequence, and the step after
    an ask cannot be launched ahead); max_pause 0 asks every step. The output is plain
    greedy's either way."""
    rng = random.Random(11)
    prompt = prompt_of(rng, 12)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    (plain,) = run(make_engine(ckpt, loaded), [(prompt, params, None)])

    class Counting(NgramDrafter):
        calls = 0

        def propose(self, seq_id, token_ids, k):
            Counting.calls += 1
            return []  # as prompt lookup on text that does not repeat

    # 59 decode steps after the prefill's token; the last has no room for a draft
    for max_pause, most in ((63, 14), (0, 58)):
        Counting.calls = 0
        engine = make_engine(ckpt, loaded)
        spec = Speculation(Counting(3, 1), 4, max_pause=max_pause)
        (out,) = run(engine, [(prompt, params, spec)])
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
        assert Counting.calls <= most and (max_pause > 0 or Counting.calls == most), Counting.calls
        assert_no_leak(engine)


def test_speculating_engines_capture_graphs_for_every_verify_row(ckpt, loaded):
    """With `speculative_config` (k drafts), the decode graphs hold max_num_seqs * (k + 1)
    rows, so a full batch of sequences verifying k drafts each still replays a graph (it ran
    eagerly when the graphs held max_num_seqs rows); without it they hold max_num_seqs."""
    from mistralpy.engine.engine import runner_config
    from mistralpy.engine.speculative import SpeculativeConfig

    spec = SpeculativeConfig("ngram", 4, 3, 1)
    assert (
        runner_config(EngineConfig(max_num_seqs=4, speculative_config=spec)).max_decode_rows == 20
    )
    assert runner_config(EngineConfig(max_num_seqs=4)).max_decode_rows == 4
    rng = random.Random(5)
    prompts = [prompt_of(rng, 10) for _ in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = run(make_engine(ckpt, loaded, max_num_seqs=4), [(p, params, None) for p in prompts])
    truth = [o.outputs[0].token_ids for o in plain]
    engine, graphs = graph_engine(ckpt, loaded, max_num_seqs=4, speculative_config=spec)
    assert graphs.buckets[-1] == 20
    outs = run(engine, [(p, params, oracle(p, t, 1.0, k=4)) for p, t in zip(prompts, truth)])
    assert [o.outputs[0].token_ids for o in outs] == truth
    assert engine.runner.graph_verify_steps > 0
    assert_no_leak(engine)
