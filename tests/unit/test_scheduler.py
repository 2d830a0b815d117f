"""Scheduler on plain data: a simulated KV cache checks that every sampled sequence sees
exactly its own tokens (and images) through its block table, whatever the scheduling."""

from __future__ import annotations

import random
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.engine.block_manager import BlockManager
from mistralpy.engine.scheduler import Scheduler
from mistralpy.engine.sequence import Sequence, SequenceStatus
from mistralpy.params import SamplingParams

IMG = 1000


class Sim:
    """Scheduler + block manager + a fake KV cache of (position, token, image hash) per slot;
    the "model" samples a token that is a hash of what the cache holds."""

    def __init__(self, num_blocks, block_size=4, max_seqs=8, budget=16, caching=True):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_seqs, budget)
        self.slots = {}
        self.arrivals = 0
        self.steps = []

    def add(self, sid, prompt, max_tokens=4, images=()):
        req = Sequence(
            sid,
            prompt,
            SamplingParams(),
            arrival=self.arrivals,
            images=list(images),
            image_token_id=IMG,
            max_tokens=max_tokens,
            seed=0,
        )
        self.arrivals += 1
        self.sched.add(req)
        return req

    def step(self):
        out = self.sched.schedule()
        assert out.total_tokens <= self.sched.max_num_batched_tokens
        assert len(out.num_new_tokens) <= self.sched.max_num_seqs
        bs = self.bm.block_size
        for sid, n in out.num_new_tokens.items():
            req = self.sched.requests[sid]
            table = self.bm.block_table(sid)
            assert len(table) * bs >= req.num_computed_tokens + n
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
                self.slots[table[pos // bs] * bs + pos % bs] = self.truth(req, pos)
        sampled = {}
        for sid in out.sample_ids:
            req = self.sched.requests[sid]
            table = self.bm.block_table(sid)
            seen = [self.slots.get(table[p // bs] * bs + p % bs) for p in range(req.num_tokens)]
            assert seen == [self.truth(req, p) for p in range(req.num_tokens)], sid
            sampled[sid] = hash(tuple(seen)) % 50
        self.sched.on_step_done(out)
        for sid, tok in sampled.items():
            req = self.sched.requests[sid]
            req.append_token(tok)
            if req.num_output_tokens >= req.max_tokens:
                self.sched.finish(sid, SequenceStatus.FINISHED_LENGTH)
        self.steps.append(out)
        return out

    @staticmethod
    def truth(req, pos):
        imgs = req.images_in(pos, pos + 1)
        tag = req.images[imgs[0][0]].content_hash if imgs else None
        return (pos, req.all_token_ids[pos], tag)

    def run(self, max_steps=500):
        done = {}
        reqs = dict(self.sched.requests)
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished()
        for sid, req in reqs.items():
            done[sid] = req.output_token_ids
        return done


def test_chunked_prefill_samples_only_at_the_end():
    sim = Sim(64, budget=16)
    sim.add("a", list(range(50)), max_tokens=2)
    outs = [sim.step() for _ in range(5)]
    assert [o.num_new_tokens["a"] for o in outs] == [16, 16, 16, 2, 1]
    assert [o.sample_ids for o in outs] == [[], [], [], ["a"], ["a"]]


def test_long_prefill_never_stalls_decodes():
    sim = Sim(64, budget=8)
    sim.add("short", [1, 2, 3], max_tokens=10)
    sim.step()  # prefill of "short"
    sim.add("long", list(range(100, 160)), max_tokens=1)
    for _ in range(5):
        out = sim.step()
        assert out.num_new_tokens["short"] == 1
        assert out.num_new_tokens["long"] == 7


def test_prefix_hit_skips_cached_tokens():
    sim = Sim(64, budget=64)
    system = list(range(200, 240))
    a = sim.add("a", system + [1, 2], max_tokens=1)
    sim.run()
    b = sim.add("b", system + [3, 4, 5], max_tokens=1)
    out = sim.step()
    assert b.num_cached_tokens == 40 and out.num_new_tokens["b"] == 3
    assert a.num_cached_tokens == 0


def test_prefix_caching_off_recomputes():
    sim = Sim(64, budget=64, caching=False)
    sim.add("a", list(range(40)), max_tokens=1)
    sim.run()
    b = sim.add("b", list(range(40)), max_tokens=1)
    sim.step()
    assert b.num_cached_tokens == 0


def test_preemption_newest_first_then_resume():
    sim = Sim(6, block_size=4, budget=64)
    sim.add("old", list(range(7)), max_tokens=9)  # grows to 16 tokens = 4 blocks
    sim.add("new", list(range(50, 57)), max_tokens=9)
    sim.step()
    preempted = []
    while sim.sched.has_unfinished():
        preempted += sim.step().preempted_ids
    assert preempted and set(preempted) == {"new"}


def test_same_image_tokens_different_images_do_not_share():
    sim = Sim(64, budget=64)
    prompt = [1, 2, IMG, IMG, IMG, IMG, IMG, 3, 4, 5]
    img = lambda h: SimpleNamespace(content_hash=h, rows=1, cols=5, pixel_values=None)  # noqa: E731
    sim.add("a", prompt, max_tokens=1, images=[img("x")])
    sim.run()
    b = sim.add("b", prompt, max_tokens=1, images=[img("y")])
    c = sim.add("c", prompt, max_tokens=1, images=[img("x")])
    sim.run()  # the simulated cache asserts each saw its own image
    assert b.num_cached_tokens == 0 and c.num_cached_tokens == 8


def reference_outputs(prompts, max_tokens):
    """Each request alone in an ample engine: the truth for any other schedule."""
    outs = {}
    for sid, prompt in prompts.items():
        sim = Sim(256, budget=1000, caching=False)
        sim.add(sid, prompt, max_tokens=max_tokens[sid])
        outs.update(sim.run())
    return outs


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    capacity=st.integers(28, 48),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
)
def test_random_arrivals_aborts_and_tiny_caches(
    seed, capacity, block_size, budget, max_seqs, caching
):
    rng = random.Random(seed)
    base = [rng.randrange(50) for _ in range(12)]
    prompts = {
        f"r{i}": base[: rng.randrange(0, 12)]
        + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
        for i in range(8)
    }
    max_tokens = {sid: rng.randrange(1, 11) for sid in prompts}
    # Capacity holds one sequence of the longest length (<= 28 tokens), as the engine ensures.
    num_blocks = -(-capacity // block_size)
    sim = Sim(num_blocks, block_size, max_seqs, budget, caching)
    pending = list(prompts)
    aborted = set()
    reqs = {}
    for _ in range(2000):
        if pending and rng.random() < 0.4:
            sid = pending.pop(0)
            reqs[sid] = sim.add(sid, prompts[sid], max_tokens[sid])
        if reqs and rng.random() < 0.05:
            sid = rng.choice(list(reqs))
            if sim.sched.finish(sid, SequenceStatus.FINISHED_ABORTED):
                aborted.add(sid)
        if not pending and not sim.sched.has_unfinished():
            break
        sim.step()
    assert not pending and not sim.sched.has_unfinished()
    want = reference_outputs(prompts, max_tokens)
    for sid, req in reqs.items():
        if sid not in aborted:
            assert req.output_token_ids == want[sid]
    assert sim.bm.num_free_blocks == sim.bm.num_blocks
    assert all(r == 0 for r in sim.bm.ref_counts)
