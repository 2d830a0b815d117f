"""CUDA graphs for decode steps: one graph per row-count bucket, over stable input buffers.

A decode step has a fixed launch shape once its rows are padded to a bucket and its block
tables to a fixed width, so the whole forward + lm_head is captured once per bucket and
replayed: ~300 kernel launches per step become one. The buffers are owned here; the runner
writes a step's inputs into them (host staging -> device, non-blocking) and replays. Padding
rows have seq_len 0 and slot -1: attention writes nothing for them and outputs zeros.

A row is one query token: its id, its position p, and its sequence's block table; it attends
to the cache's tokens [0, p]. A plain decode step has one row per sequence. A verify step
(speculative decoding) of a sequence with K drafts is K + 1 rows at positions p .. p + K that
share one block table: every row's K/V is stored before attention reads any, and each row's
seq_len p + i + 1 makes it causal, so the same graphs run it (`batch.decode_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mistralpy.kernels.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# (input_ids (B,), positions (B,), attn) -> logits (B, V) float32: the captured computation.
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Captured row counts (one row per decode token: a sequence, or one of a verify step's
    K + 1): 1, 2, 4, 8, then every 8 (then 16 past 64), up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    b = 8
    while b < max_num_seqs:
        sizes.append(b)
        b += 8 if b < 64 else 16
    return sizes + [max_num_seqs]


@dataclass
class DecodeBuffers:
    """Stable device inputs of the captured graphs, sized for the largest bucket M."""

    tokens: torch.Tensor  # (3, M) int64: input ids, positions, cache slots (-1 = no write)
    seq_lens: torch.Tensor  # (M,) int32, 0 for padding rows
    block_tables: torch.Tensor  # (M, W) int32, a fixed width W
    query_start_loc: torch.Tensor  # (M + 1,) int32: 0, 1, 2, ... (one token per row)

    @classmethod
    def allocate(cls, rows: int, width: int, device: torch.device, pin: bool) -> DecodeBuffers:
        """Buffers with every row in the padding state (pinned host memory if `pin`)."""
        tokens = torch.zeros((3, rows), dtype=torch.int64, pin_memory=pin)
        tokens[2] = -1
        bufs = cls(
            tokens=tokens,
            seq_lens=torch.zeros(rows, dtype=torch.int32, pin_memory=pin),
            block_tables=torch.zeros((rows, width), dtype=torch.int32, pin_memory=pin),
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        )
        return bufs if device.type == "cpu" else bufs.to(device)

    def to(self, device: torch.device) -> DecodeBuffers:
        return DecodeBuffers(
            *(t.to(device) for t in (self.tokens, self.seq_lens, self.block_tables,
                                     self.query_start_loc))
        )  # fmt: skip

    def metadata(self, batch: int) -> AttentionMetadata:
        """Attention metadata over the first `batch` rows (views: stable addresses)."""
        width = self.block_tables.shape[1]
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.tokens[2, :batch],
            max_query_len=1,
            max_seq_len=width,  # an upper bound; decode kernels read seq_lens on the device
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=[width] * batch,
        )


class DecodeGraphs:
    """Captured decode forwards per bucket, replayed over `self.inputs`."""

    def __init__(
        self, forward: DecodeForward, max_batch: int, width: int, block_size: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.forward = forward
        self.buckets = batch_buckets(max_batch)
        self.block_size = block_size
        self.device = device
        self.inputs = DecodeBuffers.allocate(self.buckets[-1], width, device, pin=False)
        cpu = torch.device("cpu")
        pin = device.type == "cuda"  # non-blocking copies need page-locked host memory
        self.staging = DecodeBuffers.allocate(self.buckets[-1], width, cpu, pin=pin)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def width(self) -> int:
        return self.inputs.block_tables.shape[1]

    def capture(self) -> None:
        """Warm up (compiles the Triton kernels) and capture every bucket, largest first so
        the smaller graphs reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for batch in reversed(self.buckets):
            ids, pos, attn = self._graph_args(batch)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.forward(ids, pos, attn)  # warm-up outside the graph
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self.forward(ids, pos, attn)
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    def bucket(self, batch: int) -> int | None:
        """Smallest captured bucket holding `batch` rows (None: too large, run eagerly)."""
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def load(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> int:
        """Stage one step's rows (token, its position, its sequence's block table, which must
        cover the position; see `batch.decode_rows`) and copy them to the device buffers,
        non-blocking. Rows past len(token_ids) up to the bucket are padding. Returns the bucket. The caller syncs on this step's results
        before the next `load` (the staging buffers are reused)."""
        n = len(token_ids)
        batch = self.bucket(n)
        assert batch is not None and all(len(t) <= self.width for t in tables)
        host = self.staging
        tok = host.tokens.numpy()
        pos = np.asarray(positions, dtype=np.int64)
        tok[0, :n] = token_ids
        tok[1, :n] = pos
        bt = host.block_tables.numpy()
        width = max(len(t) for t in tables)
        for i, table in enumerate(tables):
            bt[i, : len(table)] = table
        bs = self.block_size
        tok[2, :n] = bt[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        tok[:, n:batch] = np.array([[0], [0], [-1]])
        lens = host.seq_lens.numpy()
        lens[:n] = pos + 1
        lens[n:batch] = 0
        dev = self.inputs
        dev.tokens[:, :batch].copy_(host.tokens[:, :batch], non_blocking=True)
        dev.seq_lens[:batch].copy_(host.seq_lens[:batch], non_blocking=True)
        dev.block_tables[:n, :width].copy_(host.block_tables[:n, :width], non_blocking=True)
        return batch

    def advance(self, n: int, sampled: torch.Tensor) -> None:
        """On the device, turn the loaded step of `n` rows into the next one: each row's new
        input is its sampled token (n,) at the next position (which the caller checked is
        covered by its block table). No host data: runs while the host is busy elsewhere."""
        dev = self.inputs
        ids, pos, slots = dev.tokens[0, :n], dev.tokens[1, :n], dev.tokens[2, :n]
        ids.copy_(sampled)
        pos.add_(1)
        dev.seq_lens[:n].add_(1)
        bs = self.block_size
        blocks = dev.block_tables[:n].gather(1, (pos // bs)[:, None])[:, 0]
        torch.add(pos % bs, blocks.to(torch.int64), alpha=bs, out=slots)

    def replay(self, batch: int) -> torch.Tensor:
        """Run bucket `batch` over the loaded inputs; its logits (batch, V) float32 (a stable
        buffer, overwritten by the next replay)."""
        self.graphs[batch].replay()
        return self.outputs[batch]

    def _graph_args(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return (
            self.inputs.tokens[0, :batch],
            self.inputs.tokens[1, :batch],
            (self.inputs.metadata(batch)),
        )
