"""Step scheduler: decides how many new tokens each sequence computes in the next step.

One rule covers prefill, chunked prefill, decode and prefix-cache hits: a sequence has
`num_tokens` tokens of which `num_computed_tokens` are in the KV cache; a step computes some of
the rest. Each step:
1. Running sequences, decodes first (one token each), then unfinished prefills; a long prompt
   takes only what is left of the token budget, so it never stalls decodes. When blocks run out,
   the newest running sequence is preempted (blocks freed, recomputed later).
2. If nothing was preempted, waiting sequences are admitted in arrival order while the budget,
   the sequence limit and the free blocks allow; cached prefix blocks count as computed.
A sequence samples a token in the step that computes its last token.

Speculative decoding: a decoding sequence may carry drafted tokens (`Sequence.draft_ids`, set by
the engine before `schedule`); its step then computes its last token plus the drafts (a verify
chunk), and `on_drafts_verified` keeps the K/V of the accepted drafts only.

Plain data in and out; tested on CPU without a model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mistralpy.engine.block_manager import BlockManager
from mistralpy.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one step computes."""

    num_new_tokens: dict[str, int] = field(default_factory=dict)  # seq_id -> n, batch order
    sample_ids: list[str] = field(default_factory=list)  # sequences that sample this step
    preempted_ids: list[str] = field(default_factory=list)  # blocks freed this step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_new_tokens


class Scheduler:
    """Owns the waiting and running queues (both kept in arrival order)."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        assert seq.seq_id not in self.requests and seq.num_tokens >= 1
        self.requests[seq.seq_id] = seq
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_arrival)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: {seq_id: num_new_tokens} within the token budget and sequence limit."""
        out = SchedulerOutput()
        self._schedule_running(out)
        if not out.preempted_ids:
            self._schedule_waiting(out)
        for seq in self.running:  # drafts of a sequence left out of this step go stale
            if seq.seq_id not in out.num_new_tokens:
                seq.draft_ids = []
        out.sample_ids = [
            sid
            for sid, n in out.num_new_tokens.items()
            if _new_real_tokens(self.requests[sid], n) + self.requests[sid].num_computed_tokens
            == self.requests[sid].num_tokens
        ]
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens computed (their K/V are now in the cache); drafts count
        once accepted (`on_drafts_verified`)."""
        for sid, n in out.num_new_tokens.items():
            seq = self.requests.get(sid)
            if seq is None or seq.status != SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += _new_real_tokens(seq, n)
            assert seq.num_computed_tokens <= seq.num_tokens
            self.bm.cache_computed_blocks(seq)

    def on_drafts_verified(self, seq: Sequence, num_accepted: int) -> None:
        """After a verify step: the first `num_accepted` drafts (now appended to the sequence)
        keep their K/V; the rejected ones' slots are rewritten later, and blocks grown only
        for them are freed."""
        assert num_accepted <= len(seq.draft_ids)
        seq.draft_ids = []
        if seq.status != SequenceStatus.RUNNING:
            return
        seq.num_computed_tokens += num_accepted
        assert seq.num_computed_tokens < seq.num_tokens
        self.bm.trim(seq.seq_id, seq.num_tokens)
        self.bm.cache_computed_blocks(seq)

    def finish(self, seq_id: str, status: SequenceStatus) -> Sequence | None:
        """Remove a sequence (stopped, aborted, failed) and free its blocks at once."""
        assert status.finished
        seq = self.requests.pop(seq_id, None)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = status
        return seq

    def _budget(self, out: SchedulerOutput) -> int:
        return self.max_num_batched_tokens - out.total_tokens

    def _schedule_running(self, out: SchedulerOutput) -> None:
        order = sorted(
            self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival)
        )
        for seq in order:
            if self._budget(out) <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(
                seq.num_tokens - seq.num_computed_tokens + len(seq.draft_ids), self._budget(out)
            )
            assert n > 0
            del seq.draft_ids[max(0, n - 1) :]  # the budget cuts drafts first
            while not self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]  # newest arrival
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                out.num_new_tokens[seq.seq_id] = n

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        for seq in list(self.waiting):
            budget = self._budget(out)
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not _ready(seq):
                continue
            prefix = self.bm.find_cached_prefix(seq)
            num_hit = len(prefix) * self.bm.block_size
            n = min(seq.num_tokens - num_hit, budget)
            if not self.bm.allocate(seq.seq_id, num_hit + n, prefix):
                break  # first come, first served: do not let later arrivals jump ahead
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_hit
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_hit
            bisect.insort(self.running, seq, key=_arrival)
            out.num_new_tokens[seq.seq_id] = n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free all blocks of a running sequence; it is recomputed from scratch when resumed
        (its full blocks usually stay in the prefix cache, so resuming is cheap)."""
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.draft_ids = []
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        out.num_new_tokens.pop(seq.seq_id, None)
        out.preempted_ids.append(seq.seq_id)
        bisect.insort(self.waiting, seq, key=_arrival)


def _new_real_tokens(seq: Sequence, n: int) -> int:
    """Of the `n` tokens scheduled for `seq`, those that are not drafts."""
    return n - len(seq.draft_ids)


def _arrival(seq: Sequence) -> int:
    return seq.arrival


def _ready(seq: Sequence) -> bool:
    """False while `seq` waits for a sibling's prompt to be cached (n > 1 prompt sharing)."""
    leader = seq.wait_for
    if leader is not None and (
        leader.status.finished or leader.num_computed_tokens >= leader.num_prompt_tokens
    ):
        seq.wait_for = leader = None
    return leader is None
