"""Per-sequence state held by the engine, and the outputs it hands to callers.

A `Sequence` is what the scheduler runs: one prompt and one line of output. A user request with `n > 1` becomes `n` sequences ("children")
that share the prompt: child 0 is admitted first, and the others wait until its prompt is in the
KV cache, so that with prefix caching they reuse every full prompt block (only the partial last
block is recomputed). Each child draws its own samples (seed + index when a seed is given).
"""

from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mistralpy.engine.errors import ImageTokenMismatchError
from mistralpy.engine.speculative import SHADOW_AFTER_MISSES, shadow_checking
from mistralpy.params import SamplingParams

if TYPE_CHECKING:
    from mistralpy.engine.speculative import Drafter
    from mistralpy.processing.images import ProcessedImage


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed from scratch
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class TokenLogprob:
    """Log-probability of one token; `top_logprobs` lists the most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() at add_request
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    # speculative decoding, over the request's sequences (vLLM's spec-decode counters)
    num_drafts: int = 0  # verify steps (each checks one draft of up to k tokens)
    num_draft_tokens: int = 0  # drafted tokens verified by the target
    num_accepted_tokens: int = 0  # of those, accepted (emitted without a forward of their own)


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, cumulative plus the delta of this step."""

    index: int
    token_ids: list[int]
    text: str
    delta_text: str
    delta_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: str | int | None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # set when the request failed inside the engine


class Sequence:
    """One sequence: prompt, images, generated tokens and scheduling state."""

    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival: int,
        images: list[ProcessedImage] | None = None,
        image_token_id: int | None = None,
        max_tokens: int,
        seed: int,
        parent_id: str | None = None,
        index: int = 0,
        drafter: Drafter | None = None,
        num_speculative_tokens: int = 0,
        max_draft_pause: int = 0,
    ):
        self.seq_id = seq_id
        self.parent_id = parent_id if parent_id is not None else seq_id  # the user request
        self.index = index  # position among the n children of the user request
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)  # prompt + generated
        self.params = params
        self.arrival = arrival  # monotonically increasing admission order (FCFS, preemption)
        self.max_tokens = max_tokens  # already clamped to the context
        self.seed = seed
        self.images: list[ProcessedImage] = list(images or [])
        self.image_positions, self.image_starts = _image_layout(
            self.prompt_token_ids, self.images, image_token_id
        )
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_hashes: list[bytes] = []  # hash chain of full blocks, extended lazily
        self.wait_for: Sequence | None = None  # n > 1: admit only after this one's prefill
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        # speculative decoding: drafts up to k tokens per decode step (k 0 or no drafter: off)
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens if drafter is not None else 0
        # drafts of the step being scheduled: computed after all_token_ids, never part of them
        self.draft_ids: list[int] = []
        # verify steps or shadow checks in a row that found the drafts wrong; with the pause
        # policy on, a new sequence starts with its drafter on trial (`shadow_checking`)
        self.draft_misses = SHADOW_AFTER_MISSES if max_draft_pause > 0 else 0
        self.shadow_draft: int | None = None  # the drafter's guess at this step's token
        self.draft_empties = 0  # proposals in a row that drafted nothing
        self.draft_pause = 0  # decode steps left before drafting again (see draft_pause)
        self.max_draft_pause = max_draft_pause  # the longest such pause

    @property
    def on_trial(self) -> bool:
        """Its drafter is checked against plain steps' tokens, not verified (`shadow_checking`)."""
        return shadow_checking(self.draft_misses, self.max_draft_pause)

    @property
    def verifies_drafts(self) -> bool:
        """Its next decode step drafts and verifies: speculating, not paused, not on trial (a
        step that does not is plain decode, worth launching ahead)."""
        return self.num_speculative_tokens > 0 and self.draft_pause == 0 and not self.on_trial

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def images_in(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Images with tokens in positions [start, end): (image index, row_lo, row_hi) with the
        embedding rows of that image needed there, relative to the image."""
        # [lo, hi): embedding rows (over all images, in order) of the image tokens in the range
        lo = bisect.bisect_left(self.image_positions, start)
        hi = bisect.bisect_left(self.image_positions, end)
        if lo == hi:
            return []
        first = bisect.bisect_right(self.image_starts, lo) - 1
        out = []
        for i in range(first, len(self.images)):
            begin, stop = self.image_starts[i], self.image_starts[i + 1]
            if begin >= hi:
                break
            out.append((i, max(lo, begin) - begin, min(hi, stop) - begin))
        return out


def _image_layout(
    prompt: list[int], images: list[ProcessedImage], image_token_id: int | None
) -> tuple[list[int], list[int]]:
    """Positions of the image tokens in `prompt`, and where each image's rows start
    (cumulative rows*cols, length len(images) + 1). Raises if the counts disagree."""
    positions = [i for i, t in enumerate(prompt) if t == image_token_id]
    starts = [0]
    for image in images:
        starts.append(starts[-1] + image.rows * image.cols)
    if len(positions) != starts[-1]:
        raise ImageTokenMismatchError(len(positions), starts[-1])
    return positions, starts


def now() -> float:
    return time.monotonic()
