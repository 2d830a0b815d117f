"""Grammar-constrained decoding with llguidance: compile a `GrammarSpec`, then step a matcher.

Life cycle, per model and per request:

    ll_tok = ll_tokenizer_from_hf(hf_tokenizer, eos_token_ids, vocab_size)   # once per model, ~1 s
    compiled = compile_grammar(spec, ll_tok)       # per distinct spec (cached); GrammarError -> 400
    matcher = compiled.matcher()                   # per sequence: a copy of the prototype
    masker = GrammarMasker(vocab_size)             # once per engine

    each decode step (rows without a grammar pass None):
        future = masker.submit(matchers)           # worker thread, overlaps the forward pass
        logits = model(...)
        bitmask = future.result()                  # (B, ceil(V/32)) int32 on CPU, or None
        allowed = bitmask_to_allowed(bitmask, V, device) if bitmask is not None else None
        out = sample(logits, st, generators, allowed)
        for each grammar row: matcher.accept(token); if matcher.is_finished(): finish "stop"

Mask computation reads the matcher state left by the previous `accept`, so it can run while the
GPU computes the logits of the same step; llguidance releases the GIL while it computes masks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import llguidance.torch as llg_torch
import tokenizers
import torch

from mistralpy.errors import UserError
from mistralpy.params import GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # (a type of the stubs only)

# JSON layout the grammars allow: json.dumps' own separators (", " and ": ", the form
# mistral-common writes tool calls in) and no other whitespace. Any freedom here is a place
# where a weak or random model can emit whitespace token after token ("{ \t\t...") until
# max_tokens cuts a tool call or a JSON answer in half.
JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
TOOL_CHOICE_MODES = ("required", "named", "auto")


class GrammarError(UserError):
    """The grammar, schema, regex or tool spec of a request is invalid (llguidance's message).

    `param`: the request field that carried it, filled in by the API layer when known.
    """

    param: str | None = None


def ll_tokenizer_from_hf(
    tokenizer: tokenizers.Tokenizer | str,
    eos_token_ids: Sequence[int],
    vocab_size: int | None = None,
) -> llguidance.LLTokenizer:
    """Build llguidance's tokenizer from an HF `tokenizers` object or its JSON text (~1 s).

    vocab_size: the model's logit width when it exceeds the tokenizer's (masks then cover it).
    """
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_token_ids))


@dataclass(frozen=True)
class CompiledGrammar:
    """A validated grammar for one request; `matcher()` starts a sequence on it."""

    spec: GrammarSpec
    grammar: str  # llguidance's serialized grammar
    ll_tokenizer: llguidance.LLTokenizer
    # A matcher in the start state whose first mask is computed: building one parses the
    # grammar (seconds for a schema of thousands of properties), copying it takes a
    # millisecond, so every sequence of every request with this grammar starts from a copy.
    prototype: llguidance.LLMatcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.prototype.deep_copy())


def compile_grammar(spec: GrammarSpec, ll_tokenizer: llguidance.LLTokenizer) -> CompiledGrammar:
    """Translate and validate `spec`, build its prototype matcher; raises GrammarError when it
    is not a usable grammar. Seconds for a huge schema: call it off the engine thread."""
    grammar = _to_llguidance(spec, ll_tokenizer)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    if is_error:
        raise GrammarError(f"invalid {spec.kind} grammar: {messages[0]}")
    prototype = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    # The first mask builds the lexer states that later masks reuse (0.2 s for 10,000
    # properties); computed here, copies share them and the engine step does not pay it.
    llg_torch.fill_next_token_bitmask(
        prototype, llg_torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size), 0
    )
    return CompiledGrammar(spec, grammar, ll_tokenizer, prototype)


def _to_llguidance(spec: GrammarSpec, ll_tokenizer: llguidance.LLTokenizer) -> str:
    """The llguidance grammar text for each kind of spec."""
    value = spec.value
    if spec.kind == "json_schema":
        return _json_grammar(_schema_dict(value), lenient=not spec.strict)
    if spec.kind == "json_object":
        return _json_grammar({"type": "object"}, lenient=False)
    if spec.kind in ("regex", "lark"):
        if not isinstance(value, str):
            raise GrammarError(f"{spec.kind} must be a string")
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        return llguidance.LLMatcher.grammar_from_lark(value)
    if spec.kind == "choice":
        if not (
            isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value)
        ):
            raise GrammarError("choice must be a non-empty list of strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in value)
        )
    assert spec.kind == "tool_calls", spec.kind  # GrammarSpec validated the kind
    token_id = _special_token_id(ll_tokenizer, TOOL_CALLS_TOKEN)
    return llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(value, token_id))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GrammarError(message)


def _schema_dict(value: object) -> dict:
    """A JSON schema given as a dict or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from e
    _require(isinstance(value, dict), "json_schema must be a JSON object")
    return value  # type: ignore[return-value]


def _json_grammar(schema: dict, lenient: bool) -> str:
    """llguidance grammar for a JSON schema; lenient: ignore keywords it cannot enforce."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema,
            defaults=JSON_LAYOUT,
            overrides={"lenient": lenient},
        )
    except ValueError as e:
        raise GrammarError(f"invalid json_schema: {e}") from e


def _special_token_id(ll_tokenizer: llguidance.LLTokenizer, text: str) -> int:
    ids = ll_tokenizer.tokenize_str(text, parse_special=True)
    ok = len(ids) == 1 and ll_tokenizer.is_special_token(ids[0])
    _require(ok, f"the tokenizer has no {text} special token; tool calls cannot be constrained")
    return ids[0]


def _tool_calls_lark(value: object, tool_calls_id: int) -> str:
    """Lark grammar: `[TOOL_CALLS]` + JSON list of {"name", "arguments"} (Mistral v7 form).

    "required": one or more calls of any tool (exactly one when `single`, i.e. OpenAI
    `parallel_tool_calls=false`); "named": exactly one call of `name`;
    "auto": free text, or optional free text followed by the tool-call form.
    """
    if not isinstance(value, dict):
        raise GrammarError("tool_calls spec must be a dict with 'tools' and 'mode'")
    mode = value.get("mode", "required")
    _require(mode in TOOL_CHOICE_MODES, f"tool_calls mode must be one of {TOOL_CHOICE_MODES}")
    functions = _tool_functions(value.get("tools"))
    if mode == "named":
        name = value.get("name")
        if not isinstance(name, str) or name not in functions:
            raise GrammarError(f"tool_choice names an unknown function: {name!r}")
        functions = {name: functions[name]}
    calls = [_call_schema(name, params) for name, params in functions.items()]
    calls_list = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
        "x-guidance": {**JSON_LAYOUT, "lenient": True},
    }
    if mode == "named" or value.get("single"):
        calls_list["maxItems"] = 1
    calls_rule = f"calls: <[{tool_calls_id}]> %json {json.dumps(calls_list)}"
    if mode == "auto":
        return f"start: free | free? calls\nfree: /(?s:.+)/\n{calls_rule}\n"
    return f"start: calls\n{calls_rule}\n"


def _tool_functions(tools: object) -> dict[str, dict]:
    """{function name: parameters schema} from a list of OpenAI tool dicts."""
    if not (isinstance(tools, list) and tools):
        raise GrammarError("tool_calls needs a non-empty tools list")
    functions: dict[str, dict] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        _require(isinstance(name, str) and bool(name), "each tool needs a function name")
        params = function.get("parameters") or {"type": "object"}  # type: ignore[union-attr]
        _require(isinstance(params, dict), f"parameters of tool {name} must be a JSON schema")
        functions[name] = params  # type: ignore[index]
    return functions


def _call_schema(name: str, parameters: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class GrammarMatcher:
    """The grammar state of one sequence: which tokens may come next, and accepting them."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed tokens into row `row` of a (B, W) int32 CPU bitmask."""
        llg_torch.fill_next_token_bitmask(self._m, bitmask, row)

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool on CPU: True where the next token is allowed."""
        bitmask = llg_torch.allocate_token_bitmask(1, vocab_size)
        self.fill_bitmask(bitmask, 0)
        return bitmask_to_allowed(bitmask, vocab_size, "cpu")[0]

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar forbids it (matcher then errored)."""
        return self._m.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, preemption)."""
        assert self._m.rollback(num_tokens), self._m.get_error()

    def is_finished(self) -> bool:
        """True when nothing but EOS may follow (grammar complete) or the matcher errored."""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """True when the text so far is a complete sentence of the grammar (EOS allowed)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        """llguidance's message when a forbidden token was accepted, else None."""
        return self._m.get_error() or None


class GrammarMasker:
    """Builds the (B, ceil(V/32)) int32 bitmask of a batch; rows without a grammar allow all.

    Rows with grammars are computed in parallel by llguidance's thread pool; `submit` runs the
    whole computation on a worker thread so the caller can launch the forward pass meanwhile.
    """

    def __init__(self, vocab_size: int, num_threads: int | None = None, pin_memory: bool = False):
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory  # pinned buffers make the host-to-device copy async
        self._executor = llguidance.LLExecutor(num_threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")

    def compute(self, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor | None:
        """Bitmask for the next token of each row; None when no row has a grammar (no work)."""
        rows = [(m._m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        width = (self.vocab_size + 31) // 32
        shape = (len(matchers), width)
        bitmask = torch.full(shape, -1, dtype=torch.int32, pin_memory=self.pin_memory)
        if len(rows) == 1:
            llg_torch.fill_next_token_bitmask(rows[0][0], bitmask, rows[0][1])
        else:
            llg_torch.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask

    def submit(self, matchers: Sequence[GrammarMatcher | None]) -> Future[torch.Tensor | None]:
        """`compute` on the worker thread; do not `accept` into these matchers until it is done."""
        return self._worker.submit(self.compute, list(matchers))

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def bitmask_to_allowed(
    bitmask: torch.Tensor, vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """(B, W) int32 bitmask (bit j of word w = token 32 w + j) -> (B, vocab_size) bool on device.

    The packed mask (4 bytes per 32 tokens) is what crosses to the device; unpacking runs there.
    """
    packed = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed[:, :, None] >> shifts) & 1  # (B, W, 32)
    allowed = bits.reshape(packed.shape[0], -1).bool()
    if allowed.shape[1] < vocab_size:  # logits wider than the tokenizer: the rest is forbidden
        missing = allowed.new_zeros(allowed.shape[0], vocab_size - allowed.shape[1])
        allowed = torch.cat([allowed, missing], dim=1)
    return allowed[:, :vocab_size]
