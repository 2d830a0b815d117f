"""Per-request sampling parameters: a frozen, validated leaf type used by every layer.

Validation happens here, at construction, so that a bad value becomes a `ValueError`
naming the field (HTTP 400 upstream) and never reaches the batched sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Logit-bias values outside this range are almost certainly a client bug (OpenAI uses the same).
LOGIT_BIAS_LIMIT = 100.0
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class InvalidParameter(ValueError):
    """A user-supplied parameter is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the generated text, compiled by the grammar engine.

    kind: "json_schema" | "json_object" | "regex" | "lark" | "choice" | "tool_calls"
    value: the schema (dict), pattern/grammar (str), choices (tuple[str, ...]) or the tool
           spec for "tool_calls" (dict with "tools" and "mode").
    """

    kind: str
    value: object = None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature == 0 means greedy."""

    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check_finite(self.temperature, "temperature")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check_finite(self.top_p, "top_p")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or a positive integer")
        _check_finite(self.min_p, "min_p")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_finite(value, name)
            _check(-2.0 <= value <= 2.0, name, "must be in [-2, 2]")
        _check_finite(self.repetition_penalty, "repetition_penalty")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        for token, bias in self.logit_bias.items():
            _check(isinstance(token, int) and token >= 0, "logit_bias", "keys must be token ids")
            _check_finite(bias, "logit_bias")
            _check(abs(bias) <= LOGIT_BIAS_LIMIT, "logit_bias", "values must be in [-100, 100]")
        _check(1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]")
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}]",
        )
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(param, f"{param} {message}")


def _check_finite(value: float, param: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(param, f"{param} must be a finite number")
