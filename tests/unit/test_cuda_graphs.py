"""Decode-graph bookkeeping that needs no GPU: buckets, staged inputs, the on-device advance
to the next step, and matching a launched-ahead step against the engine's next batch.

Oracles: the runner's own `build_forward_batch` (slots, seq lens, block tables) on fresh
random batches, and plain Python for the advanced step.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.params import SamplingParams
from mistralpy.runner.batch import (
    SampleSpec,
    ScheduledBatch,
    SeqWork,
    build_forward_batch,
    decode_rows,
)
from mistralpy.runner.cuda_graphs import DecodeGraphs, batch_buckets
from mistralpy.runner.model_runner import _LaunchAhead


@given(st.integers(1, 300))
def test_buckets_cover_every_batch_size(max_seqs):
    buckets = batch_buckets(max_seqs)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_seqs and buckets[0] == 1
    assert all(b2 - b1 <= 16 for b1, b2 in zip(buckets, buckets[1:]))


def _random_decode_batch(rng: random.Random, n: int, block_size: int, width: int) -> list[SeqWork]:
    free = list(range(n * width))
    rng.shuffle(free)
    seqs = []
    for i in range(n):
        start = rng.randrange(width * block_size)  # the new token's position
        table = [free.pop() for _ in range(start // block_size + 1)]
        if rng.random() < 0.5 and len(table) < width:
            table.append(free.pop())  # sometimes a spare block past the token
        spec = SampleSpec(SamplingParams(temperature=0.0, max_tokens=64), [1], [], 0)
        seqs.append(SeqWork(f"s{i}", [rng.randrange(1000)], start, table, [], spec))
    return seqs


def _graphs(width: int, block_size: int, max_batch: int) -> DecodeGraphs:
    def no_forward(*args):
        raise AssertionError("not captured on CPU")

    return DecodeGraphs(no_forward, max_batch, width, block_size, torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), n=st.integers(1, 12), bs=st.sampled_from([1, 4, 16]))
def test_load_matches_forward_batch_and_pads(seed, n, bs):
    rng = random.Random(seed)
    width = rng.randint(1, 6)
    graphs = _graphs(width, bs, 12)
    for _ in range(2):  # a second load over stale buffers must not leak old rows
        seqs = _random_decode_batch(rng, rng.randint(1, n), bs, width)
        m = len(seqs)
        bucket = graphs.load(
            [s.token_ids[0] for s in seqs], [s.start_pos for s in seqs],
            [s.block_table for s in seqs],
        )  # fmt: skip
        assert bucket == graphs.bucket(m) and bucket >= m
        fb = build_forward_batch(ScheduledBatch(seqs), bs, torch.device("cpu"), width)
        dev = graphs.inputs
        assert torch.equal(dev.tokens[0, :m], fb.input_ids)
        assert torch.equal(dev.tokens[1, :m], fb.positions)
        assert torch.equal(dev.tokens[2, :m], fb.attn.slot_mapping)
        assert torch.equal(dev.seq_lens[:m], fb.attn.seq_lens)
        for i, s in enumerate(seqs):
            assert dev.block_tables[i, : len(s.block_table)].tolist() == s.block_table
        assert (dev.seq_lens[m:bucket] == 0).all() and (dev.tokens[2, m:bucket] == -1).all()
        meta = dev.metadata(bucket)
        assert meta.max_query_len == 1 and meta.query_start_loc.tolist() == list(range(bucket + 1))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), n=st.integers(1, 8), bs=st.sampled_from([2, 16]))
def test_advance_is_the_next_decode_step(seed, n, bs):
    rng = random.Random(seed)
    width = rng.randint(2, 5)
    seqs = [
        s for s in _random_decode_batch(rng, n, bs, width)
        if s.start_pos + 1 < len(s.block_table) * bs  # the runner's precondition
    ] or None  # fmt: skip
    if seqs is None:
        return
    graphs = _graphs(width, bs, 8)
    bucket = graphs.load(
        [s.token_ids[0] for s in seqs], [s.start_pos for s in seqs], [s.block_table for s in seqs]
    )
    padding = graphs.inputs.tokens[:, len(seqs) : bucket].clone()
    sampled = torch.randint(0, 1000, (len(seqs),))
    graphs.advance(len(seqs), sampled)
    nxt = [
        SeqWork(s.seq_id, [int(t)], s.start_pos + 1, s.block_table, [], s.sample)
        for s, t in zip(seqs, sampled)
    ]
    fb = build_forward_batch(ScheduledBatch(nxt), bs, torch.device("cpu"), width)
    dev, m = graphs.inputs, len(seqs)
    assert torch.equal(dev.tokens[0, :m], fb.input_ids)
    assert torch.equal(dev.tokens[1, :m], fb.positions)
    assert torch.equal(dev.tokens[2, :m], fb.attn.slot_mapping)
    assert torch.equal(dev.seq_lens[:m], fb.attn.seq_lens)
    assert torch.equal(dev.tokens[:, m:bucket], padding)


def _next(seqs: list[SeqWork], tokens: list[int]) -> list[SeqWork]:
    return [
        SeqWork(s.seq_id, [t], s.start_pos + 1, list(s.block_table), [], s.sample)
        for s, t in zip(seqs, tokens)
    ]


def test_launch_ahead_matches_same_rows_and_ordered_subsets_only():
    rng = random.Random(0)
    seqs = _random_decode_batch(rng, 4, 16, 4)
    ahead = _LaunchAhead(seqs, 4)
    tokens = [11, 12, 13, 14]
    ahead.tokens = tokens
    nxt = _next(seqs, tokens)
    assert ahead.match(nxt) == [0, 1, 2, 3]
    assert ahead.match([nxt[0], nxt[2]]) == [0, 2]  # seqs 1 and 3 finished
    assert ahead.match([nxt[2], nxt[0]]) is None  # order changed
    wrong_token = _next(seqs, [11, 99, 13, 14])
    assert ahead.match(wrong_token) is None
    moved = _next(seqs, tokens)
    moved[1].start_pos += 1
    assert ahead.match(moved) is None
    swapped = _next(seqs, tokens)
    swapped[3].block_table[0] = 10_000  # a block of the launched step was replaced
    assert ahead.match(swapped) is None
    grown = _next(seqs, tokens)
    grown[0].block_table.append(10_001)  # a new block past the launched step is fine
    assert ahead.match(grown) == [0, 1, 2, 3]
    extra = SeqWork("new", [5], 0, [7], [], seqs[0].sample)
    assert ahead.match([*nxt, extra]) is None


@pytest.mark.parametrize(
    "max_tokens, produced, ends", [(None, 5, False), (6, 5, True), (9, 5, False)]
)
def test_ends_on_length(max_tokens, produced, ends):
    from mistralpy.runner.model_runner import _ends_on_length

    spec = SampleSpec(SamplingParams(max_tokens=max_tokens), [1], [3] * produced, 0)
    assert _ends_on_length(SeqWork("s", [1], 9, [0], [], spec)) is ends


def _random_verify_batch(rng: random.Random, n: int, bs: int, width: int) -> list[SeqWork]:
    """Decode sequences, about half of them verifying 1-5 drafts (a table that covers them)."""
    seqs = []
    for s in _random_decode_batch(rng, n, bs, width):
        k = rng.choice([0, rng.randint(1, 5)])
        k = min(k, len(s.block_table) * bs - s.start_pos - 1)  # drafts inside the table
        drafts = [rng.randrange(1000) for _ in range(k)]
        spec = SampleSpec(s.spec.params, [1], [], 0, draft_ids=drafts, speculative=True)
        seqs.append(SeqWork(s.seq_id, s.token_ids + drafts, s.start_pos, s.block_table, [], spec))
    return seqs


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), n=st.integers(1, 6), bs=st.sampled_from([1, 4, 16]))
def test_verify_rows_are_decode_rows_at_consecutive_positions(seed, n, bs):
    """A mixed batch (plain and verifying sequences) expands into one row per token: token
    t_i at position p + i, slot table[pos // bs] * bs + pos % bs, seq_len pos + 1, the
    sequence's block table; the same tokens, positions and slots as the eager forward batch,
    whose logits rows are then every row in order (every token samples)."""
    rng = random.Random(seed)
    width = rng.randint(1, 6)
    graphs = _graphs(width, bs, 32)
    for _ in range(2):  # a second load over stale buffers must not leak old rows
        seqs = _random_verify_batch(rng, n, bs, width)
        rows = decode_rows(seqs)
        bucket = graphs.load(rows.token_ids, rows.positions, rows.tables)
        m = len(rows.token_ids)
        assert m == sum(1 + len(s.spec.draft_ids) for s in seqs) and bucket >= m
        expect = [
            (t, s.start_pos + i, s.block_table)
            for s in seqs
            for i, t in enumerate(s.token_ids)
        ]  # fmt: skip
        dev = graphs.inputs
        for row, (token, pos, table) in enumerate(expect):
            assert dev.tokens[0, row] == token and dev.tokens[1, row] == pos
            assert dev.tokens[2, row] == table[pos // bs] * bs + pos % bs
            assert dev.seq_lens[row] == pos + 1
            assert dev.block_tables[row, : len(table)].tolist() == table
        assert (dev.seq_lens[m:bucket] == 0).all() and (dev.tokens[2, m:bucket] == -1).all()
        fb = build_forward_batch(ScheduledBatch(seqs), bs, torch.device("cpu"), width)
        assert torch.equal(dev.tokens[0, :m], fb.input_ids)
        assert torch.equal(dev.tokens[1, :m], fb.positions)
        assert torch.equal(dev.tokens[2, :m], fb.attn.slot_mapping)
        assert fb.logits_rows.tolist() == list(range(m))
