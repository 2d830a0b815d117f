"""Deciding when a sequence stops, and which text may be streamed before it does.

Stop strings are matched on the detokenized text, incrementally: each delta is appended, the
earliest occurrence of any stop string (it may span tokens and deltas) ends the sequence, and
text that could still turn out to be the beginning of a stop string is held back, so that no
part of a stop string is ever emitted. The engine calls, per sequence and per new token:

    matcher = StopStringMatcher(params.stop)          # once per sequence
    upd = matcher.update(delta_text)                  # after each detokenized delta
    emit upd.text; if upd.stop_string is not None: finish("stop", stop_reason=upd.stop_string)
    ... finish_reason_for_token(...) -> "stop" / "length" / None
    on any other finish: emit matcher.flush()          # releases the held-back tail

`StopChecker` bundles the two for the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mistralpy.params import SamplingParams


@dataclass(frozen=True)
class StopUpdate:
    """The outcome of feeding one delta to a `StopStringMatcher`."""

    text: str  # text to emit now (never contains any part of a stop string)
    stop_string: str | None  # the stop string that matched, or None if still running


class StopStringMatcher:
    """Incremental stop-string search over a growing text; O(len(delta) + longest stop) a step.

    Invariants: `text[:emitted]` has been released and contains no stop string and no part of
    one; `text[emitted:]` is the held-back tail, the longest suffix of `text` that is a proper
    prefix of some stop string.
    """

    def __init__(self, stop: Sequence[str]):
        assert all(stop), "empty stop strings are rejected by SamplingParams"
        self.stop = tuple(stop)
        self.text = ""  # everything fed so far (up to the stop string once matched)
        self.emitted = 0  # length of the released prefix
        self.stop_string: str | None = None

    @property
    def final_text(self) -> str:
        """The output text: all text fed so far, cut before the stop string if one matched."""
        return self.text if self.stop_string is None else self.text[: self.emitted]

    def update(self, delta: str) -> StopUpdate:
        """Append `delta`; report what may be emitted and whether a stop string completed."""
        assert self.stop_string is None, "update() after the sequence stopped"
        self.text += delta
        if not self.stop:
            return StopUpdate(self._release(len(self.text)), None)
        # A match cannot start inside released text: it would have been held back instead.
        found = _earliest_match(self.text, self.stop, self.emitted)
        if found is not None:
            start, matched = found
            self.stop_string = matched
            return StopUpdate(self._release(start), matched)
        hold = _longest_partial_match(self.text, self.stop, self.emitted)
        return StopUpdate(self._release(len(self.text) - hold), None)

    def flush(self) -> str:
        """Release the held-back tail (the sequence ended without a stop string)."""
        if self.stop_string is not None:
            return ""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


def _earliest_match(text: str, stop: Iterable[str], start: int) -> tuple[int, str] | None:
    """(position, string) of the leftmost stop string in text[start:]; ties: first listed."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _longest_partial_match(text: str, stop: Iterable[str], start: int) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def finish_reason_for_token(
    token_id: int,
    num_output_tokens: int,
    num_total_tokens: int,
    params: SamplingParams,
    eos_token_ids: Iterable[int],
    max_model_len: int,
) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after `token_id` became output token number `num_output_tokens`.

    "stop" with the token id as stop_reason for params.stop_token_ids; "stop" with None for
    EOS (unless ignore_eos); "length" when max_tokens is reached or the sequence
    (`num_total_tokens`, prompt + output) fills the context; (None, None) otherwise.
    """
    if token_id in params.stop_token_ids:
        return "stop", token_id
    if not params.ignore_eos and token_id in eos_token_ids:
        return "stop", None
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return "length", None
    if num_total_tokens >= max_model_len:
        return "length", None
    return None, None


@dataclass(frozen=True)
class StopDecision:
    """What the engine does with a sequence after one new token."""

    text: str  # delta text to stream now
    finish_reason: str | None  # "stop" | "length" | None (still running)
    stop_reason: str | int | None  # matched stop string, stop token id, or None


class StopChecker:
    """Per-sequence stop logic: stop strings first, then stop tokens / EOS, then length.

    A stop string wins over a length limit hit on the same token (the text really stopped).
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int], max_model_len: int):
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.strings = StopStringMatcher(params.stop)

    def step(
        self, token_id: int, delta_text: str, num_output_tokens: int, num_total_tokens: int
    ) -> StopDecision:
        """Feed one sampled token and its detokenized delta (already appended to the sequence)."""
        update = self.strings.update(delta_text)
        if update.stop_string is not None:
            return StopDecision(update.text, "stop", update.stop_string)
        reason, stop_reason = finish_reason_for_token(
            token_id,
            num_output_tokens,
            num_total_tokens,
            self.params,
            self.eos_token_ids,
            self.max_model_len,
        )
        if reason is None:
            return StopDecision(update.text, None, None)
        return StopDecision(update.text + self.strings.flush(), reason, stop_reason)

    def finish(self) -> str:
        """Text still held back when the sequence ends for another reason (abort, grammar)."""
        return self.strings.flush()
