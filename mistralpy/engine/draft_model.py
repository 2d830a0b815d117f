"""Speculative decoding with a draft model (vLLM's method "draft_model"): a small model that
shares the target's vocabulary proposes the next k tokens greedily.

`DraftModelDrafter` owns a `ModelRunner` of its own (weights, paged KV cache) and a
`BlockManager` of its own (no prefix caching), on the target's device. Per sequence it keeps the tokens whose K/V its cache
holds; each `propose` feeds what changed since the last call (the whole prompt the first time;
afterwards the accepted drafts and the target's token, the K/V of rejected drafts being
overwritten in place), then runs k greedy decode steps. Greedy drafts are q one-hot, which the
target's acceptance rule (`kernels.sampling.verify_drafts`) already handles exactly.

One sequence at a time: the draft steps of a batch are not batched together (simple, and the
draft is small; batching them is the next step for throughput at high concurrency). When its
cache is full the drafter proposes nothing for that sequence: the target decodes as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mistralpy.engine.block_manager import BlockManager
from mistralpy.engine.config import EngineConfig, resolve_model_path
from mistralpy.params import InvalidParameter, SamplingParams
from mistralpy.runner.batch import SampleSpec, ScheduledBatch, SeqWork
from mistralpy.runner.model_runner import ModelRunner, RunnerConfig

logger = logging.getLogger(__name__)

# CUDA: share of `gpu_memory_utilization` the draft model takes (weights + its KV cache). It
# loads before the target, whose memory profile then counts the draft's allocations as used.
DRAFT_MEMORY_SHARE = 0.1
_GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Vocabulary:
    """What must agree between a target and its draft model for draft ids to mean the same."""

    name: str  # the model, as the user named it (for error messages)
    vocab_size: int
    bos_token_id: int
    eos_token_id: int


def read_vocabulary(name: str, path: Path, mmproj: str | None = None) -> Vocabulary:
    """The vocabulary of the checkpoint at `path` (config.json + tokenizer; no weights read)."""
    from mistralpy.model.config import read_config
    from mistralpy.processing.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    vocab_size = read_config(path, mmproj).text_config.vocab_size
    return Vocabulary(name, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)


def check_same_vocabulary(target: Vocabulary, draft: Vocabulary) -> None:
    """Raise InvalidParameter naming both models unless their vocabularies agree."""
    for what in ("vocab_size", "bos_token_id", "eos_token_id"):
        mine, theirs = getattr(draft, what), getattr(target, what)
        if mine != theirs:
            raise InvalidParameter(
                "speculative_config",
                f"speculative_config: the draft model {draft.name!r} has {what} {mine}, the "
                f"target {target.name!r} has {theirs}; a draft model must share the target's "
                "tokenizer vocabulary",
            )


class DraftModelDrafter:
    """Drafts with a small model on its own runner and KV cache (see the module docstring)."""

    def __init__(self, runner: ModelRunner, max_len: int):
        self.runner = runner
        self.max_len = max_len  # positions the draft attends over (its context, at most)
        self.chunk = runner.cfg.max_num_batched_tokens  # prefill tokens per forward, at most
        # the draft cache's block tables (no prefix caching: one sequence's tokens at a time)
        self.blocks = BlockManager(runner.num_blocks, runner.cfg.block_size, False)
        self.seqs: dict[str, list[int]] = {}  # per sequence: tokens whose K/V the cache holds

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        runner_cfg: RunnerConfig,
        target: Vocabulary,
        device: torch.device,
        dtype: torch.dtype,
    ) -> DraftModelDrafter:
        """Load `config.speculative_config.model` once its vocabulary is checked to be
        `target`'s. runner_cfg: the target runner's settings (the draft's derive from them)."""
        spec = config.speculative_config
        assert spec is not None and spec.model is not None
        path = resolve_model_path(spec.model)
        check_same_vocabulary(target, read_vocabulary(spec.model, path))  # before the weights
        runner = ModelRunner.load(
            path, draft_runner_config(runner_cfg), device, dtype, None, config.load_format,
            config.dtype != "auto",
        )  # fmt: skip
        max_pos = runner.model.config.text_config.max_position_embeddings
        logger.info("draft model %s: %d KV blocks", spec.model, runner.num_blocks)
        return cls(runner, min(max_pos, runner.num_blocks * runner.cfg.block_size))

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def propose(self, seq_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k greedy tokens of the draft model after `token_ids`; [] when its context or
        its free KV blocks do not reach that far."""
        ids = list(token_ids)
        k = min(k, self.max_len - len(ids) + 1)  # the last draft needs no K/V of its own
        cached = self.seqs.setdefault(seq_id, [])
        start = _common_prefix(cached, ids, len(ids) - 1)
        del cached[start:]  # rejected drafts: their K/V is overwritten below
        if k <= 0 or not self.blocks.allocate(seq_id, len(ids) + k - 1):
            self.blocks.trim(seq_id, start)
            return []
        self.blocks.trim(seq_id, len(ids) + k - 1)  # blocks grown for an earlier longer draft
        drafts = [self._forward(seq_id, cached, ids[start:], last=k == 1)]
        for step in range(1, k):
            drafts.append(self._forward(seq_id, cached, drafts[-1:], last=step == k - 1))
        return drafts

    def release(self, seq_id: str) -> None:
        """Free the sequence's blocks (it finished or was aborted); unknown ids are ignored."""
        self.seqs.pop(seq_id, None)
        self.blocks.free(seq_id)
        self.runner.release([seq_id])

    def _forward(self, seq_id: str, cached: list[int], new_ids: list[int], last: bool) -> int:
        """Compute `new_ids` after the `cached` tokens (prefill chunks of at most `chunk`
        tokens), appending them to it; returns the greedy next token. last: no decode is
        launched ahead after it."""
        table = self.blocks.block_table(seq_id)
        for at in range(0, len(new_ids), self.chunk):
            piece = new_ids[at : at + self.chunk]
            ends = at + len(piece) == len(new_ids)
            sample = SampleSpec(_GREEDY, [], [], None, speculative=last) if ends else None
            work = SeqWork(seq_id, piece, len(cached), list(table), [], sample)
            out = self.runner.execute(ScheduledBatch([work]))
            cached += piece
        return out.sampled[seq_id].token_id


def draft_runner_config(target: RunnerConfig) -> RunnerConfig:
    """The draft runner's settings: the target's, with one sequence a step and its share of
    the GPU memory."""
    share = target.gpu_memory_utilization * DRAFT_MEMORY_SHARE
    return replace(target, max_num_seqs=1, gpu_memory_utilization=share)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
