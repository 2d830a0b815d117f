"""Speculative decoding, engine side: its configuration and the drafters that propose tokens.

A drafter guesses the next k tokens of a sequence cheaply; the target model then checks all k
in one forward pass (the runner's verify step), so a batch-1 decode reads the weights once per
several tokens instead of once per token. The drafters here need no weights
(`engine/draft_model.py` holds the one that runs a small model):

- `NgramDrafter` (prompt lookup, vLLM's "ngram" method): find the latest earlier occurrence of
  the sequence's last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) and
  propose the tokens that followed it. Pays off when the answer copies its input (rewrites,
  summaries, code edits).
- `OracleDrafter` (benchmarks and tests): proposes a known continuation, each token replaced by
  a random one with probability 1 - alpha, so that acceptance can be forced on random weights.

Drafters are deterministic proposals (q is one-hot), which the acceptance rule relies on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mistralpy.params import InvalidParameter

SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16  # a longer draft costs more per verify than it can win back
NGRAM_MODEL_NAME = "[ngram]"  # vLLM's older `--speculative-model "[ngram]"`
# The longest pause (decode steps) between a drafter's tries once it keeps missing or
# finding nothing: a try is then a shadow check or an empty proposal, which costs only the
# drafter's host time (a scan), and a copy may start any time, so it tries at least every 8
# steps (on the SmolLM2 rewrite prompt caps of 7 and 63 accepted the same tokens). 0: no
# pauses and no checks, every step verifies (the forcing harness times verify steps so).
MAX_DRAFT_PAUSE = 7


class Drafter(Protocol):
    """Proposes up to `k` next tokens of a sequence from its token ids (prompt + output).
    One drafter serves many sequences: a stateful one (a draft model's KV) keys its state by
    `seq_id` and drops it in `release`, which the engine calls once the sequence finishes."""

    def propose(self, seq_id: str, token_ids: Sequence[int], k: int) -> list[int]: ...

    def release(self, seq_id: str) -> None: ...


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding of one request: who drafts, and up to how many tokens a step."""

    drafter: Drafter
    num_speculative_tokens: int
    # decode steps between the drafter's tries after misses, at most (`draft_pause`); 0: draft
    # every step (the forcing harness measures verify steps, not the policy)
    max_pause: int = MAX_DRAFT_PAUSE


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `--speculative-config` for the methods we serve. Validated at construction."""

    method: str = "ngram"  # "ngram" (prompt lookup) | "draft_model" (a small model drafts)
    num_speculative_tokens: int = 4  # k: drafted tokens verified per step
    prompt_lookup_max: int = 5  # longest suffix n-gram matched against earlier text
    prompt_lookup_min: int = 5  # shortest one tried before giving up (vLLM's defaults: 5, 5)
    model: str | None = None  # the draft model (path, named model or hub id): "draft_model"

    def __post_init__(self) -> None:
        _check(
            self.method in SPECULATIVE_METHODS,
            "method",
            f"must be one of {SPECULATIVE_METHODS}",
        )
        _check_int(self.num_speculative_tokens, "num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        _check_int(self.prompt_lookup_min, "prompt_lookup_min", 1, 64)
        _check_int(self.prompt_lookup_max, "prompt_lookup_max", self.prompt_lookup_min, 64)
        draft = self.method == "draft_model"
        _check(
            (self.model is not None) == draft,
            "model",
            "is needed by method 'draft_model' and only by it",
        )

    def speculation(self, draft_model: Drafter | None = None) -> Speculation:
        """What a request gets by default under this configuration; `draft_model`: the
        loaded drafter of method "draft_model" (the engine loads it, see draft_model.py)."""
        if self.method == "draft_model":
            assert draft_model is not None, "method draft_model needs its loaded drafter"
            return Speculation(draft_model, self.num_speculative_tokens)
        drafter = NgramDrafter(self.prompt_lookup_max, self.prompt_lookup_min)
        return Speculation(drafter, self.num_speculative_tokens)


def parse_speculative_config(value: str | dict | None) -> SpeculativeConfig | None:
    """vLLM's `--speculative-config` (JSON text or a dict) -> SpeculativeConfig (None: off).

    A `model` other than "[ngram]" is a draft model (method "draft_model", as vLLM infers).
    Raises InvalidParameter naming what is wrong: bad JSON, an unknown key, a bad value."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidParameter("speculative_config", f"speculative_config: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidParameter("speculative_config", "speculative_config must be a JSON object")
    options = dict(value)
    model = options.get("model")
    if model == NGRAM_MODEL_NAME:
        options.pop("model")
        options.setdefault("method", "ngram")
    elif model is not None:
        _check(isinstance(model, str) and model != "", "model", "must be a path or model id")
        options.setdefault("method", "draft_model")
    if "method" not in options:
        raise InvalidParameter("speculative_config", "speculative_config needs a 'method'")
    known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidParameter(
            "speculative_config",
            f"speculative_config: unknown keys {unknown} (known: {sorted(known)})",
        )
    # vLLM: one bound given, the other takes its value
    options.setdefault("prompt_lookup_max", options.get("prompt_lookup_min", 5))
    options.setdefault("prompt_lookup_min", options["prompt_lookup_max"])
    return SpeculativeConfig(**options)


def legacy_speculative_config(
    model: str | None, num_speculative_tokens: int | None
) -> SpeculativeConfig | None:
    """vLLM's older `--speculative-model "[ngram]"` + `--num-speculative-tokens N`."""
    if model is None:
        if num_speculative_tokens is not None:
            raise InvalidParameter(
                "num_speculative_tokens", "--num-speculative-tokens needs --speculative-model"
            )
        return None
    options: dict = {"model": model}
    if num_speculative_tokens is not None:
        options["num_speculative_tokens"] = num_speculative_tokens
    return parse_speculative_config(options)


def draft_pause(misses: int, max_pause: int = MAX_DRAFT_PAUSE) -> int:
    """Decode steps to take without trying the drafter after `misses` tries in a row (shadow
    checks, or empty proposals) found nothing: 0, 1, 3, 7, ... up to max_pause."""
    return min((1 << max(misses - 1, 0)) - 1, max_pause)


# verify steps in a row that accept nothing before the drafter goes (back) on trial: at
# alpha 0.7, k 4 three misses in a row happen once in ~37 verify steps (two: once in ~11)
SHADOW_AFTER_MISSES = 3


def shadow_checking(misses: int, max_pause: int = MAX_DRAFT_PAUSE) -> bool:
    """Whether a sequence checks its drafter on plain decode steps instead of verifying
    drafts: after `misses` verify steps (then checks) in a row found its drafts wrong, with
    the pause policy on (max_pause > 0). A check compares the drafter's first token with the
    token the plain step samples: it tells what a one-draft verify step would, at no GPU
    cost (no extra row, and the step may still be launched ahead), so a drafter that keeps
    failing costs nothing but its own host time. A sequence starts checking
    (`Sequence.draft_misses`): its drafter earns verify steps with a hit."""
    return max_pause > 0 and misses >= SHADOW_AFTER_MISSES


class NgramDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the last n tokens."""

    def __init__(self, max_n: int, min_n: int = 1):
        assert 1 <= min_n <= max_n
        self.max_n = max_n
        self.min_n = min_n

    def propose(self, seq_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the longest suffix n-gram
        (n in [min_n, max_n]); [] when no suffix occurs earlier."""
        ids = list(token_ids)
        reverse = ids[::-1]  # the latest match is the first one found scanning this
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = _latest_match(reverse, n)
            if start is not None:
                return ids[start + n : start + n + k]
        return []

    def release(self, seq_id: str) -> None:
        """Nothing to drop: prompt lookup keeps no state."""


def _latest_match(reverse: list[int], n: int) -> int | None:
    """Start of the latest occurrence of the last n tokens that ends before the last token,
    else None; `reverse` is the sequence reversed. There the suffix is reverse[:n] and an
    occurrence ending at position e of the sequence starts at q = len - 1 - e >= 1, so the
    first q found is the latest occurrence: `list.index` scans at C speed (a decode step
    calls this; a Python loop over a 32k-token context took ~4 ms)."""
    pattern = reverse[:n]
    first, size = pattern[0], len(reverse)
    q = 0
    while True:
        try:
            q = reverse.index(first, q + 1, size - n + 1)
        except ValueError:
            return None
        if reverse[q : q + n] == pattern:
            return size - q - n


class OracleDrafter:
    """Proposes `continuation` (the tokens known to follow `prefix_len` tokens), each token
    replaced with probability 1 - alpha by a different random one (seeded): a draft that is
    right with probability alpha, for measuring the verify machinery on random weights."""

    def __init__(
        self, prefix_len: int, continuation: Sequence[int], alpha: float, vocab_size: int, seed: int
    ):
        assert 0.0 <= alpha <= 1.0 and vocab_size >= 2
        self.prefix_len = prefix_len
        self.continuation = list(continuation)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)

    def propose(self, seq_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        at = len(token_ids) - self.prefix_len
        truth = self.continuation[at : at + k] if at >= 0 else []
        return [t if self._rng.random() < self.alpha else self._wrong(t) for t in truth]

    def _wrong(self, token: int) -> int:
        other = self._rng.randrange(self.vocab_size - 1)
        return other + 1 if other >= token else other

    def release(self, seq_id: str) -> None:
        """Nothing to drop: one known continuation, whatever the sequence."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise InvalidParameter("speculative_config", f"speculative_config: {key} {message}")


def _check_int(value: object, key: str, low: int, high: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    _check(ok, key, f"must be an integer in [{low}, {high}]")
