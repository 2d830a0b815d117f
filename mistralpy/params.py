"""Per-request sampling parameters: a frozen, validated leaf type used by every layer.

Validation happens here, at construction, so that a bad value becomes a `ValueError`
naming the field (HTTP 400 upstream) and never reaches the batched sampler. Every check is
type-safe: a value of the wrong type raises `InvalidParameter`, never `TypeError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mistralpy.errors import UserError

# Logit-bias values outside this range are almost certainly a client bug (OpenAI uses the same).
LOGIT_BIAS_LIMIT = 100.0
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# Seeds are int64, as OpenAI and vLLM take them (a torch generator takes no wider value).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark", "choice", "tool_calls")


class InvalidParameter(UserError):
    """A user-supplied parameter is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the generated text, compiled by the grammar engine.

    kind: "json_schema" | "json_object" | "regex" | "lark" | "choice" | "tool_calls"
    value: the schema (dict or JSON text), pattern/grammar (str), choices (sequence of str) or
           the tool spec for "tool_calls": {"tools": [OpenAI tool dicts],
           "mode": "required" | "named" | "auto", "name": str (for "named")}.
    strict: json_schema only; True rejects schema keywords the grammar engine cannot enforce,
            False ignores them (OpenAI `strict`).
    """

    kind: str
    value: object = None
    strict: bool = False

    def __post_init__(self) -> None:
        check_param(self.kind in GRAMMAR_KINDS, "grammar", f"kind must be one of {GRAMMAR_KINDS}")


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
        # Lists are accepted for convenience and frozen into tuples (the type stays hashable).
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            check_param(isinstance(value, (list, tuple)), name, "must be a list")
            object.__setattr__(self, name, tuple(value))
        self._check_ints()
        self._check_floats()
        check_param(isinstance(self.logit_bias, dict), "logit_bias", "must be a mapping")
        for token, bias in self.logit_bias.items():
            check_param(_is_int(token) and token >= 0, "logit_bias", "keys must be token ids")
            _check_finite(bias, "logit_bias")
            check_param(
                abs(bias) <= LOGIT_BIAS_LIMIT, "logit_bias", "values must be in [-100, 100]"
            )
        check_param(
            len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings"
        )
        check_param(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty")
        check_param(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be token ids >= 0",
        )
        for name in ("ignore_eos", "logprobs", "skip_special_tokens"):
            check_param(isinstance(getattr(self, name), bool), name, "must be a boolean")
        check_param(
            self.grammar is None or isinstance(self.grammar, GrammarSpec),
            "grammar",
            "must be a GrammarSpec",
        )

    def _check_ints(self) -> None:
        check_param(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "must be an integer >= 1",
        )
        check_param(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            "must be -1, 0 (disabled) or a positive integer",
        )
        check_param(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]")
        check_param(
            _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}]",
        )
        check_param(
            self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            "must be an integer in [-2**63, 2**63 - 1]",
        )

    def _check_floats(self) -> None:
        _check_range(self.temperature, "temperature", 0.0, 100.0, "must be in [0, 100]")
        _check_range(self.top_p, "top_p", 0.0, 1.0, "must be in (0, 1]")
        check_param(self.top_p > 0.0, "top_p", "must be in (0, 1]")
        _check_range(self.min_p, "min_p", 0.0, 1.0, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(getattr(self, name), name, -2.0, 2.0, "must be in [-2, 2]")
        _check_range(self.repetition_penalty, "repetition_penalty", 0.0, 10.0, "must be in (0, 10]")
        check_param(self.repetition_penalty > 0.0, "repetition_penalty", "must be in (0, 10]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise InvalidParameter if a token id named by the request lies outside the vocab.

        Needs the model, so the engine calls it when a request is added (not per step).
        """
        for token in self.logit_bias:
            check_param(token < vocab_size, "logit_bias", f"token id {token} >= vocab size")
        for token in self.stop_token_ids:
            check_param(token < vocab_size, "stop_token_ids", f"token id {token} >= vocab size")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_param(ok: bool, param: str, message: str) -> None:
    """Raise InvalidParameter(param, "param message") unless ok (a 400 naming the field)."""
    if not ok:
        raise InvalidParameter(param, f"{param} {message}")


def _check_finite(value: object, param: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:  # float() of a huge int overflows rather than giving inf
        ok = ok and math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidParameter(param, f"{param} must be a finite number")


def _check_range(value: object, param: str, low: float, high: float, message: str) -> None:
    _check_finite(value, param)
    check_param(low <= value <= high, param, message)  # type: ignore[operator]
