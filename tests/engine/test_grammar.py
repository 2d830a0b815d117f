"""Grammar-constrained decoding: a random-logits "model" masked by llguidance, outputs checked
with independent validators (jsonschema, re, json) on the real Tekken vocabulary."""

from __future__ import annotations

import json
import random
import re
import time

import jsonschema
import pytest
import tokenizers
import torch

from mistralpy.kernels.sampling import SamplingTensors, sample
from mistralpy.params import GrammarSpec, SamplingParams
from mistralpy.processing.grammar import (
    GrammarError,
    GrammarMasker,
    bitmask_to_allowed,
    compile_grammar,
    ll_tokenizer_from_hf,
)

EOS = 2
TOOL_CALLS_ID = 9


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> tokenizers.Tokenizer:
    """The tiny checkpoint's tokenizer.json (real Tekken vocabulary), as the engine loads it."""
    from mistralpy.testing.tiny_checkpoint import write_tokenizer_files

    out = write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.id_to_token(TOOL_CALLS_ID) == "[TOOL_CALLS]" and tok.id_to_token(EOS) == "</s>"
    return tok


@pytest.fixture(scope="module")
def ll_tok(hf_tokenizer):
    return ll_tokenizer_from_hf(hf_tokenizer, [EOS])


@pytest.fixture(scope="module")
def vocab(hf_tokenizer) -> int:
    return hf_tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def model_bias(hf_tokenizer, vocab) -> torch.Tensor:
    """(V,) logit offset of the random "model": it dislikes whitespace-only tokens.

    Grammars allow bounded whitespace between JSON tokens, and the vocabulary has hundreds of
    whitespace tokens; a uniform model would mostly babble whitespace and take long to finish.
    """
    bias = torch.zeros(vocab)
    for token, idx in hf_tokenizer.get_vocab().items():
        if set(token) <= set("ĠĊĉč"):  # byte-level spellings of space, \n, \t, \r
            bias[idx] = -20.0
    return bias


@pytest.fixture(scope="module")
def masker(vocab):
    m = GrammarMasker(vocab, num_threads=2)
    yield m
    m.close()


def generate(compiled, masker, model_bias, seed, max_steps=300, timings=None):
    """Decode each grammar with random logits; returns per-row token ids (EOS excluded)."""
    vocab = model_bias.shape[0]
    gen = torch.Generator().manual_seed(seed)
    matchers = [c.matcher() for c in compiled]
    st = SamplingTensors.from_params(
        [SamplingParams()] * len(compiled), [[]] * len(compiled), [[]] * len(compiled), vocab, "cpu"
    )
    outputs: list[list[int]] = [[] for _ in compiled]
    live = list(matchers)
    for _ in range(max_steps):
        start = time.perf_counter()
        bitmask = masker.compute(live)
        if bitmask is None:
            return outputs
        computed = time.perf_counter()
        allowed = bitmask_to_allowed(bitmask, vocab, "cpu")
        if timings is not None:
            timings.append((computed - start, time.perf_counter() - computed))
        logits = torch.randn(len(compiled), vocab, generator=gen) * 4 + model_bias
        tokens = sample(logits, st, [gen] * len(compiled), allowed).token_ids.tolist()
        for row, matcher in enumerate(live):
            if matcher is None:
                continue
            assert matcher.accept(tokens[row]), matcher.error
            if tokens[row] != EOS:
                outputs[row].append(tokens[row])
            if matcher.is_finished():
                live[row] = None
    raise AssertionError("grammar did not finish within max_steps")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema with required/optional string, int, bool, enum, array, nested fields."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    props = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind == "string":
            s = {"type": "string", "maxLength": rng.randint(0, 8)}
            if rng.random() < 0.3:
                s["minLength"] = rng.randint(0, s["maxLength"])
        elif kind == "integer":
            s = {"type": "integer"}
            if rng.random() < 0.5:
                lo = rng.randint(-50, 50)
                s.update(minimum=lo, maximum=lo + rng.randint(0, 100))
        elif kind == "boolean":
            s = {"type": "boolean"}
        elif kind == "enum":
            s = {"enum": rng.sample(["red", "green", "blue", "a b", "é", "42"], rng.randint(1, 4))}
        elif kind == "array":
            item = rng.choice(
                [
                    {"type": "boolean"},
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 3},
                ]
            )
            s = {"type": "array", "items": item, "maxItems": rng.randint(0, 3)}
        else:
            s = random_schema(rng, depth + 1)
        props[f"f{i}_{kind}"] = s
    names = list(props)
    required = names if rng.random() < 0.5 else rng.sample(names, rng.randint(1, len(names)))
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def test_json_schema_outputs_validate_on_random_schemas(ll_tok, hf_tokenizer, masker, model_bias):
    rng = random.Random(time.time_ns())  # fresh schemas each run; the seed is in the failure
    seed = rng.randrange(2**31)
    rng = random.Random(seed)
    schemas = [random_schema(rng) for _ in range(64)]
    timings: dict[int, list[float]] = {1: [], 16: []}
    for start in range(0, len(schemas), 16):
        batch = schemas[start : start + 16]
        compiled = [
            compile_grammar(GrammarSpec("json_schema", s, strict=True), ll_tok) for s in batch
        ]
        outs = generate(compiled, masker, model_bias, seed + start, timings=timings[16])
        for schema, ids in zip(batch, outs):
            text = hf_tokenizer.decode(ids, skip_special_tokens=False)
            jsonschema.validate(json.loads(text), schema)  # raises with the seed in context
    single = compile_grammar(GrammarSpec("json_schema", schemas[0]), ll_tok)
    generate([single], masker, model_bias, seed, timings=timings[1])
    for batch, ts in timings.items():
        fill = sorted(t[0] for t in ts)
        unpack = sorted(t[1] for t in ts)
        print(
            f"\ngrammar mask overhead, batch {batch}, {len(ts)} steps (seed {seed}): llguidance "
            f"fill median {1e3 * fill[len(fill) // 2]:.3f} ms, p90 {1e3 * fill[len(fill) * 9 // 10]:.3f}"
            f" ms; CPU unpack to bool median {1e3 * unpack[len(unpack) // 2]:.3f} ms"
        )


def test_regex_and_choice_outputs(ll_tok, hf_tokenizer, masker, model_bias):
    patterns = [
        r"[a-z]{3,8}-[0-9]{2,4}",
        r"(yes|no|maybe)!?",
        r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}",
        r"\((x|y),[0-9]\)",
    ]
    choices = ["Paris", "London", "New York", "東京"]
    specs = [GrammarSpec("regex", p) for p in patterns] * 2 + [GrammarSpec("choice", choices)] * 4
    outs = generate([compile_grammar(s, ll_tok) for s in specs], masker, model_bias, seed=5)
    for spec, ids in zip(specs, outs):
        text = hf_tokenizer.decode(ids, skip_special_tokens=False)
        if spec.kind == "regex":
            assert re.fullmatch(spec.value, text), (spec.value, text)
        else:
            assert text in choices


def tool(name, params=None):
    fn = {"name": name, "description": "d"}
    if params is not None:
        fn["parameters"] = params
    return {"type": "function", "function": fn}


def parse_tool_calls(ids, hf_tokenizer):
    assert ids[0] == TOOL_CALLS_ID
    return json.loads(hf_tokenizer.decode(ids[1:], skip_special_tokens=False))


def test_tool_call_outputs_parse_into_valid_calls(ll_tok, hf_tokenizer, masker, model_bias):
    rng = random.Random(7)
    # (A tool without parameters takes any object: unbounded for a random model; see the auto test.)
    tools = [tool(f"fn_{i}", random_schema(rng)) for i in range(3)]
    params = {
        t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools
    }
    specs = [GrammarSpec("tool_calls", {"tools": tools, "mode": "required"})] * 6 + [
        GrammarSpec("tool_calls", {"tools": tools, "mode": "named", "name": "fn_1"})
    ] * 4
    outs = generate([compile_grammar(s, ll_tok) for s in specs], masker, model_bias, seed=8)
    for spec, ids in zip(specs, outs):
        calls = parse_tool_calls(ids, hf_tokenizer)
        assert isinstance(calls, list) and len(calls) >= 1
        if spec.value["mode"] == "named":
            assert len(calls) == 1 and calls[0]["name"] == "fn_1"
        for call in calls:
            assert set(call) == {"name", "arguments"}
            jsonschema.validate(call["arguments"], params[call["name"]])


def consume_all(matcher, ids):
    return all(matcher.accept(t) for t in ids)


def test_auto_tool_mode_allows_text_or_calls(ll_tok, hf_tokenizer):
    tools = [
        tool("get", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
        tool("no_params"),
    ]
    compiled = compile_grammar(GrammarSpec("tool_calls", {"tools": tools, "mode": "auto"}), ll_tok)
    text = hf_tokenizer.encode("Plain answer.", add_special_tokens=False).ids
    call = hf_tokenizer.encode(
        '[{"name": "get", "arguments": {"q": "x"}}]', add_special_tokens=False
    ).ids
    bad = hf_tokenizer.encode('[{"name": "put", "arguments": {}}]', add_special_tokens=False).ids
    m = compiled.matcher()
    assert consume_all(m, text) and m.is_accepting()
    m = compiled.matcher()
    assert consume_all(m, [TOOL_CALLS_ID] + call) and m.is_accepting()
    m = compiled.matcher()
    assert consume_all(m, text + [TOOL_CALLS_ID] + call) and m.is_accepting()
    free_args = hf_tokenizer.encode(
        '[{"name": "no_params", "arguments": {"k": [1]}}]', add_special_tokens=False
    ).ids
    m = compiled.matcher()
    assert consume_all(m, [TOOL_CALLS_ID] + free_args) and m.is_accepting()
    m = compiled.matcher()
    assert not consume_all(m, [TOOL_CALLS_ID] + bad)
    assert m.error


def test_json_object_mask_and_forced_sequence(ll_tok, hf_tokenizer, vocab):
    compiled = compile_grammar(GrammarSpec("json_object"), ll_tok)
    m = compiled.matcher()
    allowed = m.allowed_token_mask(vocab)
    assert allowed.shape == (vocab,) and allowed.dtype == torch.bool
    assert allowed[hf_tokenizer.token_to_id("{")] and not allowed[hf_tokenizer.token_to_id("[")]
    assert not allowed[EOS]
    ids = hf_tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False).ids
    assert consume_all(m, ids)
    assert m.is_finished()
    assert m.allowed_token_mask(vocab).nonzero().flatten().tolist() == [EOS]


def test_matcher_rejects_forbidden_token_and_rolls_back(ll_tok, hf_tokenizer):
    m = compile_grammar(GrammarSpec("choice", ["abc"]), ll_tok).matcher()
    a = hf_tokenizer.encode("a", add_special_tokens=False).ids
    assert consume_all(m, a)
    m.rollback(len(a))
    assert m.error is None
    assert not m.accept(hf_tokenizer.token_to_id("z"))
    assert m.error and m.is_finished()


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (GrammarSpec("regex", "a("), "unclosed group"),
        (GrammarSpec("lark", "start: foo"), "foo"),
        (GrammarSpec("json_schema", {"type": "objectx"}), "objectx"),
        (GrammarSpec("json_schema", {"type": "string", "format": "weird"}, strict=True), "weird"),
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("json_schema", [1]), "JSON object"),
        (GrammarSpec("regex", 5), "string"),
        (GrammarSpec("choice", []), "non-empty"),
        (GrammarSpec("tool_calls", {"tools": [], "mode": "required"}), "tools"),
        (GrammarSpec("tool_calls", {"tools": [tool("f")], "mode": "named", "name": "g"}), "'g'"),
        (GrammarSpec("tool_calls", {"tools": [tool("f")], "mode": "sometimes"}), "mode"),
        (GrammarSpec("tool_calls", {"tools": [{"function": {}}]}), "name"),
    ],
)
def test_invalid_grammars_raise_grammar_error(ll_tok, spec, fragment):
    with pytest.raises(GrammarError) as info:
        compile_grammar(spec, ll_tok)
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value)


def test_lenient_schema_ignores_unknown_format(ll_tok):
    compile_grammar(GrammarSpec("json_schema", {"type": "string", "format": "weird"}), ll_tok)


def test_masker_rows_without_grammar_allow_everything_and_submit_matches(ll_tok, vocab):
    compiled = compile_grammar(GrammarSpec("regex", "[0-9]+"), ll_tok)
    with_grammar = [None, compiled.matcher(), None, compiled.matcher()]
    masker = GrammarMasker(vocab)
    try:
        assert masker.compute([None, None]) is None
        bitmask = masker.compute(with_grammar)
        assert torch.equal(masker.submit(with_grammar).result(), bitmask)
    finally:
        masker.close()
    allowed = bitmask_to_allowed(bitmask, vocab, "cpu")
    assert allowed[0].all() and allowed[2].all()
    assert torch.equal(allowed[1], with_grammar[1].allowed_token_mask(vocab))
    assert 0 < int(allowed[1].sum()) < vocab
    wider = bitmask_to_allowed(bitmask, vocab + 40, "cpu")
    assert wider.shape == (4, vocab + 40) and not wider[:, vocab:].any()


def accepts(compiled, hf_tokenizer, text: str, prefix: tuple[int, ...] = ()) -> bool:
    m = compiled.matcher()
    return consume_all(m, [*prefix, *hf_tokenizer.encode(text, add_special_tokens=False).ids])


BOUNDED = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["x"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "spec, prefix, good, bad",
    [
        (
            GrammarSpec("tool_calls", {"tools": [tool("f", BOUNDED)], "mode": "required"}),
            (TOOL_CALLS_ID,),
            '[{"name": "f", "arguments": {"x": 1}}]',
            ['[{ "name"', '[{"name":  "f"', '[{"name": "f",\n', '[\t{"name"'],
        ),
        (
            GrammarSpec("json_schema", {"type": "object", "properties": {"a": {"type": "array"}}}),
            (),
            '{"a": [1, {"b": 2}]}',
            ['{ "a"', '{"a":\n', '{"a": [1,  2', '{"a": [1] }'],
        ),
    ],
)
def test_json_whitespace_is_only_json_dumps_separators(
    ll_tok, hf_tokenizer, spec, prefix, good, bad
):
    """A random model cannot spend its tokens on whitespace inside a call or a JSON answer."""
    compiled = compile_grammar(spec, ll_tok)
    assert accepts(compiled, hf_tokenizer, good, prefix)
    for text in bad:
        assert not accepts(compiled, hf_tokenizer, text, prefix), text


def test_forced_tool_call_of_a_uniform_random_model_ends_soon(ll_tok, hf_tokenizer, masker, vocab):
    """No whitespace bias this time: the grammar alone must bring the call to its end."""
    spec = GrammarSpec("tool_calls", {"tools": [tool("f", BOUNDED)], "mode": "required"})
    specs = [spec] * 4
    outs = generate([compile_grammar(s, ll_tok) for s in specs], masker, torch.zeros(vocab), 3, 200)
    for ids in outs:
        assert parse_tool_calls(ids, hf_tokenizer)[0]["name"] == "f"


def test_sequences_start_from_copies_of_one_built_matcher(ll_tok, hf_tokenizer):
    """#17 item 10: each sequence built its own matcher from the grammar text (2.5 s each
    for a huge schema, n times per request). Copies of the compiled prototype cost a small
    part of one build and are independent of each other."""
    # 400 optional properties: llguidance refuses a parser row of over 2,000 items (~4 each)
    props = {f"field_{i}": {"type": "integer"} for i in range(400)}
    spec = GrammarSpec("json_schema", {"type": "object", "properties": props})
    start = time.perf_counter()
    compiled = compile_grammar(spec, ll_tok)
    built = time.perf_counter() - start
    start = time.perf_counter()
    matchers = [compiled.matcher() for _ in range(8)]
    copied = time.perf_counter() - start
    assert copied < built / 4, f"8 matchers took {copied:.3f} s, the compile {built:.3f} s"
    answer = hf_tokenizer.encode('{"field_7": 3}', add_special_tokens=False).ids
    assert consume_all(matchers[0], answer) and matchers[0].is_accepting()
    assert not matchers[1].is_accepting()  # untouched by its sibling's tokens
    assert consume_all(matchers[1], answer[:2])
    assert consume_all(compiled.matcher(), answer)  # the prototype stays at the start
