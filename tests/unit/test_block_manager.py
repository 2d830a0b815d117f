"""Block manager: allocation, prefix-cache keys (tokens + images), LRU eviction, no leaks."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.engine.block_manager import BlockManager
from mistralpy.engine.sequence import Sequence
from mistralpy.params import SamplingParams

IMG = 1000  # image token id used by these tests (outside the text ids used)


def make_req(sid, prompt, images=(), arrival=0):
    return Sequence(
        sid,
        prompt,
        SamplingParams(),
        arrival=arrival,
        images=list(images),
        image_token_id=IMG,
        max_tokens=8,
        seed=0,
    )


def image(content_hash, n):
    return SimpleNamespace(content_hash=content_hash, rows=1, cols=n, pixel_values=None)


def compute_all(bm, req):
    """Pretend the whole sequence was computed and let the manager key its blocks."""
    assert bm.allocate(req.seq_id, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)


def check_invariants(bm):
    held = {}
    for table in bm.tables.values():
        for b in table:
            held[b] = held.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == held.get(b, 0) >= 0
        assert (b in bm.free_blocks) == (bm.ref_counts[b] == 0)
    for key, b in bm.cached.items():
        assert bm.block_keys[b] == key
    assert sum(k is not None for k in bm.block_keys) == len(bm.cached)


def test_prefix_hit_leaves_last_token_to_compute():
    bm = BlockManager(16, 4)
    a = make_req("a", list(range(20, 32)))  # 12 tokens = 3 full blocks
    compute_all(bm, a)
    b = make_req("b", list(range(20, 32)) + [99])
    assert bm.find_cached_prefix(b) == bm.block_table("a")[:3]
    same = make_req("c", list(range(20, 32)))  # identical prompt: last block recomputed
    assert bm.find_cached_prefix(same) == bm.block_table("a")[:2]
    diverge = make_req("d", [20, 21, 22, 23, 0, 25, 26, 27, 28])
    assert bm.find_cached_prefix(diverge) == bm.block_table("a")[:1]


def test_same_text_different_image_misses():
    bm = BlockManager(16, 4)
    prompt = [1, 2, IMG, IMG, IMG, 3, 4, 5, 6, 8, 9]
    a = make_req("a", prompt, [image("h1", 3)])
    compute_all(bm, a)
    other = make_req("b", prompt + [10], [image("h2", 3)])
    assert bm.find_cached_prefix(other) == []
    same = make_req("c", prompt + [10], [image("h1", 3)])
    assert bm.find_cached_prefix(same) == bm.block_table("a")[:2]
    # Text after the image changes nothing before it: the first block still hits.
    changed_tail = make_req("d", prompt[:5] + [0] * 8, [image("h1", 3)])
    assert bm.find_cached_prefix(changed_tail) == bm.block_table("a")[:1]


def test_shared_blocks_are_refcounted_and_survive_free():
    bm = BlockManager(8, 4)
    a = make_req("a", list(range(9)))
    compute_all(bm, a)
    b = make_req("b", list(range(9)))
    prefix = bm.find_cached_prefix(b)
    assert bm.allocate(b.seq_id, 9, prefix)
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    bm.free(a.seq_id)
    check_invariants(bm)
    assert all(bm.ref_counts[x] == 1 for x in prefix)
    bm.free(b.seq_id)
    check_invariants(bm)
    assert bm.num_free_blocks == 8 and len(bm.cached) == 2


def test_eviction_prefers_unkeyed_then_least_recently_freed():
    bm = BlockManager(4, 2)
    old = make_req("old", [1, 2, 3])
    compute_all(bm, old)  # blocks: [1,2] keyed, [3] partial
    bm.free(old.seq_id)
    new = make_req("new", [5, 6, 7])
    compute_all(bm, new)
    bm.free(new.seq_id)
    assert len(bm.cached) == 2
    # Two blocks are free and unkeyed (the partial ones): used first, cache untouched.
    filler = make_req("f", [0, 0, 0, 9])
    assert bm.allocate(filler.seq_id, 4)
    assert len(bm.cached) == 2
    bm.free(filler.seq_id)
    grow = make_req("g", [9] * 7)
    assert bm.allocate(grow.seq_id, 7)  # needs 4 blocks: evicts both keyed blocks, oldest first
    assert bm.cached == {}
    assert not bm.allocate("x", 1)
    check_invariants(bm)


def test_allocate_failure_changes_nothing():
    bm = BlockManager(3, 2)
    a = make_req("a", [1, 2, 3, 4])
    compute_all(bm, a)
    bm.free(a.seq_id)
    b = make_req("b", [1, 2, 3, 4, 5, 6, 7, 8])
    prefix = bm.find_cached_prefix(b)
    assert len(prefix) == 2
    assert not bm.allocate(b.seq_id, 8, prefix)
    check_invariants(bm)
    assert bm.num_free_blocks == 3 and bm.block_table("b") == []


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "compute", "free"]),
        st.integers(0, 5),
        st.lists(st.integers(0, 2), min_size=1, max_size=12),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 4), st.integers(2, 12))
def test_random_operations_never_leak(ops, block_size, num_blocks):
    bm = BlockManager(num_blocks, block_size)
    live: dict[str, Sequence] = {}
    for op, slot, tokens in ops:
        sid = f"r{slot}"
        req = live.get(sid)
        if op == "add" and req is None:
            req = make_req(sid, tokens)
            prefix = bm.find_cached_prefix(req)
            if bm.allocate(req.seq_id, len(prefix) * block_size + 1, prefix):
                req.num_computed_tokens = len(prefix) * block_size
                live[sid] = req
        elif op == "grow" and req is not None:
            req.append_token(tokens[0])
            bm.allocate(req.seq_id, req.num_tokens)
        elif op == "compute" and req is not None:
            held = len(bm.block_table(sid)) * block_size
            req.num_computed_tokens = min(req.num_tokens, held)
            bm.cache_computed_blocks(req)
        elif op == "free" and req is not None:
            bm.free(live.pop(sid).seq_id)
        check_invariants(bm)
    for req in live.values():
        bm.free(req.seq_id)
    check_invariants(bm)
    assert bm.num_free_blocks == num_blocks and not bm.tables
