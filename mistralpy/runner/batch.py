"""The batch the runner accepts (`ScheduledBatch`, plain data built by the engine) and its
tensor form (`ForwardBatch`) that the model consumes.

Tokens of all sequences are packed into one flat dimension T. Block tables are handed to
attention as one padded (B, max_blocks) int32 tensor that a kernel indexes directly; padding
entries are never read because `seq_lens` bounds each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from mistralpy.kernels.attention import AttentionMetadata
from mistralpy.params import SamplingParams

if TYPE_CHECKING:
    from mistralpy.processing.grammar import GrammarMatcher


@dataclass
class ImageSlice:
    """Rows [start, end) of one image's encoder output, needed by this step's tokens.

    key None: `end` image-token ids that the model generated as text; they are embedded as
    ordinary tokens (the model's own embedding of the image token id), not as an image.
    """

    key: str | None  # image content hash: the encoder-cache key
    pixel_values: torch.Tensor | None  # (3, H, W) float32, normalised
    start: int
    end: int


@dataclass
class SampleSpec:
    """How to sample the next token of a sequence (given when the step reaches its end)."""

    params: SamplingParams
    prompt_ids: list[int]  # for repetition penalties
    output_ids: list[int]  # generated so far
    seed: int | None  # seeds the sequence's generator the first time it samples (None: none)
    grammar: GrammarMatcher | None = None  # restricts the next token
    # Speculative decoding: the last K of the SeqWork's token_ids are drafted tokens to verify
    # (logits at all K + 1 positions; the runner accepts a prefix of them, see verify_drafts)
    draft_ids: list[int] = field(default_factory=list)
    speculative: bool = False  # the sequence drafts next step: never launch that step ahead


@dataclass
class SeqWork:
    """One sequence's share of a step: compute `token_ids` at positions start_pos, ..."""

    seq_id: str
    token_ids: list[int]
    start_pos: int  # tokens already in the cache for this sequence
    block_table: list[int]  # covers start_pos + len(token_ids) tokens
    images: list[ImageSlice]  # image-embedding rows for the image tokens among token_ids
    sample: SampleSpec | None  # None: a prefill chunk that does not end the sequence

    @property
    def spec(self) -> SampleSpec:
        """`sample` of a sequence that samples this step (the runner's sampling rows only)."""
        assert self.sample is not None, f"{self.seq_id} samples nothing this step"
        return self.sample


@dataclass
class ScheduledBatch:
    seqs: list[SeqWork]


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, absolute position in its sequence
    attn: AttentionMetadata
    # (R,) int64: the last-token row of each sampling sequence, in order; a sequence
    # verifying K drafts has its last K + 1 rows there
    logits_rows: torch.Tensor
    sample_seqs: list[SeqWork]  # the S sampling sequences, in row order
    image_slices: list[ImageSlice]  # in the order their image tokens appear in input_ids


@dataclass
class DecodeRows:
    """A step's rows for the decode CUDA graphs (`runner.cuda_graphs`): one per computed
    token, a sequence's rows consecutive."""

    token_ids: list[int]
    positions: list[int]  # absolute position of each row's token in its sequence
    tables: list[list[int]]  # each row's block table (the sequence's, shared by its rows)


def decode_rows(seqs: list[SeqWork]) -> DecodeRows:
    """Rows of a step where sequence s computes its token_ids at start_pos, start_pos + 1, ...
    (one token for plain decode, the last token + K drafts for a verify step)."""
    return DecodeRows(
        [t for s in seqs for t in s.token_ids],
        [s.start_pos + i for s in seqs for i in range(len(s.token_ids))],
        [s.block_table for s in seqs for _ in s.token_ids],
    )


def build_forward_batch(
    batch: ScheduledBatch,
    block_size: int,
    device: torch.device,
    block_table_width: int | None = None,
) -> ForwardBatch:
    """Pack `batch` into device tensors. `block_table_width` pads block tables to a fixed
    width (stable shapes for graph capture); default: the widest table in the batch."""
    seqs = batch.seqs
    query_lens = [len(s.token_ids) for s in seqs]
    seq_lens = [s.start_pos + n for s, n in zip(seqs, query_lens)]
    qsl = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    width = block_table_width or max(len(s.block_table) for s in seqs)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    positions = np.empty(int(qsl[-1]), dtype=np.int64)
    slots = np.empty(int(qsl[-1]), dtype=np.int64)
    for i, s in enumerate(seqs):
        assert len(s.block_table) * block_size >= seq_lens[i]
        tables[i, : len(s.block_table)] = s.block_table
        pos = np.arange(s.start_pos, seq_lens[i], dtype=np.int64)
        positions[qsl[i] : qsl[i + 1]] = pos
        slots[qsl[i] : qsl[i + 1]] = tables[i, pos // block_size] * block_size + pos % block_size
    rows = [
        row
        for i, s in enumerate(seqs)
        if s.sample is not None
        for row in range(int(qsl[i + 1]) - 1 - len(s.sample.draft_ids), int(qsl[i + 1]))
    ]
    ids = [t for s in seqs for t in s.token_ids]

    def dev(array: np.ndarray | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype).to(device, non_blocking=True)

    attn = AttentionMetadata(
        query_start_loc=dev(qsl, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        block_tables=dev(tables, torch.int32),
        slot_mapping=dev(slots, torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        first_block_if_run=[_first_block_if_run(s.block_table) for s in seqs],
    )
    return ForwardBatch(
        input_ids=dev(ids, torch.int64),
        positions=dev(positions, torch.int64),
        attn=attn,
        logits_rows=dev(rows, torch.int64),
        sample_seqs=[s for s in seqs if s.sample is not None],
        image_slices=[im for s in seqs for im in s.images],
    )


def _first_block_if_run(table: list[int]) -> int | None:
    """table[0] if the table is the run table[0], table[0] + 1, ... (else None)."""
    if not table or table[-1] - table[0] != len(table) - 1:
        return None
    return table[0] if table == list(range(table[0], table[0] + len(table))) else None
