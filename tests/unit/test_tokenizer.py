"""Tokenizer and IncrementalDetokenizer against mistral-common's Tekkenizer (the oracle)."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralpy.processing.tokenizer import IncrementalDetokenizer, Tokenizer
from mistralpy.testing.tiny_checkpoint import write_tokenizer_files

SPECIAL_STRINGS = ["[INST]", "[/INST]", "<s>", "</s>", "[IMG]", "[TOOL_CALLS]", "<SPECIAL_42>"]
NASTY = [
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\u00a0",
    "\u3000",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "日本語",
    "한국어",
    "ǅ",
    "e\u0301",
    "123456",
    "٣٤",
    "\ufdd0",
    "'s",
    "``",
    "/",
    "\\",
    '"',
    "{",
    "<",
    "[",
]


def texts():
    """Unicode text with emoji, CJK, whitespace runs, digits and special-token strings."""
    pieces = st.one_of(
        st.text(max_size=12),
        st.sampled_from(NASTY + SPECIAL_STRINGS),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    )
    return st.lists(pieces, max_size=12).map("".join)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tekkenizer(tok_dir):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(str(tok_dir / "tekken.json"))


@pytest.fixture(scope="module")
def fast(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def native(tok_dir, tmp_path_factory):
    only_tekken = tmp_path_factory.mktemp("native")
    shutil.copy(tok_dir / "tekken.json", only_tekken / "tekken.json")
    return Tokenizer.from_dir(only_tekken)


def test_special_ids_match_mistral_common(fast, native, tekkenizer):
    from mistral_common.tokens.tokenizers.base import SpecialTokens

    assert fast.vocab_size == native.vocab_size == tekkenizer.n_words == 131072
    assert fast.special_token_ids == native.special_token_ids == tekkenizer.special_ids
    for tok in (fast, native):
        for name in ("bos", "eos", "unk", "pad"):
            assert getattr(tok, f"{name}_token_id") == getattr(tekkenizer, f"{name}_id")
        assert tok.image_token_id == tekkenizer.get_special_token(SpecialTokens.img.value)
        assert tok.image_break_token_id == tekkenizer.get_special_token(
            SpecialTokens.img_break.value
        )
        assert tok.image_end_token_id == tekkenizer.get_special_token(SpecialTokens.img_end.value)
        for s in SpecialTokens:
            if tekkenizer.is_special(s.value):
                assert tok.token_to_id(s.value) == tekkenizer.get_special_token(s.value)
                assert tok.id_to_token(tok.token_to_id(s.value)) == s.value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts())
def test_encode_matches_tekkenizer(fast, native, tekkenizer, text):
    expected = tekkenizer.encode(text, bos=False, eos=False)
    assert fast.encode(text) == expected
    assert native.encode(text) == expected
    assert fast.encode(text, add_special_tokens=True) == [tekkenizer.bos_id, *expected]
    assert fast.decode(expected) == tekkenizer.decode(expected) == text


def test_parse_special_maps_control_strings(fast, tekkenizer):
    text = "a[INST] b</s>[x]<c>[IMG]"
    ids = fast.encode(text, parse_special=True)
    specials = [i for i in ids if fast.is_special(i)]
    assert specials == [3, 2, 10]
    assert fast.decode(ids, skip_special_tokens=False) == text
    assert fast.decode(ids) == "a b[x]<c>"
    # plain encode: control strings are text, as mistral-common encodes user text
    assert not any(fast.is_special(i) for i in fast.encode(text))
    assert fast.encode(text) == tekkenizer.encode(text, bos=False, eos=False)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 131071), max_size=30), skip=st.booleans())
def test_decode_random_ids_matches_tokenizers(fast, tok_dir, ids, skip):
    hf = _hf(tok_dir)
    assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


_HF_CACHE: dict = {}


def _hf(tok_dir):
    from tokenizers import Tokenizer as HFTokenizer

    if tok_dir not in _HF_CACHE:
        _HF_CACHE[tok_dir] = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return _HF_CACHE[tok_dir]


def _stream(tok, ids, chunks, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids=[1, 3], skip_special_tokens=skip)
    deltas, start = [], 0
    for size in chunks:
        deltas.append(detok.step(ids[start : start + size]))
        start += size
    deltas.append(detok.step(ids[start:]))
    return deltas, detok.flush()


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.one_of(st.integers(0, 131071), st.integers(1000, 1300)), max_size=40),
    chunks=st.lists(st.integers(0, 4), max_size=20),
    skip=st.booleans(),
)
def test_incremental_random_ids(fast, ids, chunks, skip):
    deltas, tail = _stream(fast, ids, chunks, skip)
    full = fast.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    # every delta is final: the streamed text is always a prefix of the full decode
    assert full.startswith("".join(deltas))


@settings(max_examples=150, deadline=None)
@given(text=texts(), chunks=st.lists(st.integers(1, 3), max_size=30))
def test_incremental_never_emits_replacement_for_split_chars(fast, native, text, chunks):
    for tok in (fast, native):
        ids = tok.encode(text)
        deltas, tail = _stream(tok, ids, chunks)
        assert "".join(deltas) == text and tail == ""
        assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_incremental_one_token_at_a_time_emoji_cjk(fast):
    text = "😀👍🏽 日本語のテキスト 🇫🇷 ∑ x"
    ids = fast.encode(text)
    byte_tokens = [
        i for i in ids if len(fast.token_bytes(i)) == 1 and fast.token_bytes(i)[0] >= 0x80
    ]
    assert byte_tokens, "text should need byte-fallback tokens for this test to mean anything"
    detok = IncrementalDetokenizer(fast, [], True)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) == text and detok.flush() == ""
    assert "\ufffd" not in "".join(deltas)
    assert detok.text == text and detok.output_ids == ids


def test_incremental_incomplete_tail_flushes_replacement(fast):
    euro = fast.encode("€")  # 3 UTF-8 bytes
    partial = [1000 + 0xE2]  # the byte token for 0xE2 (ids 1000..1255 are the 256 bytes)
    detok = IncrementalDetokenizer(fast, [], True)
    assert detok.step(partial) == ""
    assert detok.flush() == "\ufffd" == fast.decode(partial)
    assert fast.decode(euro) == "€"


def test_token_lookup(fast, tekkenizer):
    ids = tekkenizer.encode(" hello", bos=False, eos=False)
    assert len(ids) == 1
    assert fast.id_to_token(ids[0]) == " hello"
    assert fast.token_to_id(" hello") == ids[0]
    assert fast.token_to_id("not a single token at all") is None
    assert fast.is_special(0) and not fast.is_special(ids[0])


def test_missing_files_raise(tmp_path):
    from mistralpy.processing.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="no tokenizer.json or tekken.json"):
        Tokenizer.from_dir(tmp_path)


def test_wrong_split_regex_in_tokenizer_json_is_replaced_by_tekken_pattern(
    tok_dir, tekkenizer, tmp_path
):
    # Some hub tokenizer.json files of Mistral Small 3.1 carry a wrong pre-tokenizer regex;
    # with tekken.json beside it, Tekken's own pattern wins.
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": r"\S+|\s+"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    text = "Hello, wörld! 12345 it's"
    broken = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert broken.encode(text) != tekkenizer.encode(text, bos=False, eos=False)
    shutil.copy(tok_dir / "tekken.json", tmp_path / "tekken.json")
    fixed = Tokenizer.from_dir(tmp_path)
    assert fixed.encode(text) == tekkenizer.encode(text, bos=False, eos=False)


def word_texts():
    """texts() with words and spaces mixed in, so there are many places to cut."""
    words = st.sampled_from(["a", "Hello", "été", "日本", "x1", "ǅa", "e\u0301"])
    seps = st.sampled_from([" ", "  ", " \n", "\n", ". ", "", "\t"])
    return st.lists(st.one_of(texts(), words, seps), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=word_texts(), size=st.integers(1, 12))
def test_encoding_word_end_pieces_equals_one_shot(fast, native, text, size):
    """Long prompts are encoded in pieces so that a client that leaves stops the work
    (#17 item 4); the ids must equal the whole text's, on both backends."""
    from mistralpy.processing.tokenizer import word_end_pieces

    pieces = word_end_pieces(text, size)
    assert "".join(pieces) == text
    for tok in (fast, native):
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_stop_flag_ends_a_long_encoding(fast):
    import threading

    from mistralpy.processing.tokenizer import ENCODE_PIECE_CHARS, EncodingStopped

    text = "lorem ipsum " * (3 * ENCODE_PIECE_CHARS // 12)
    stop = threading.Event()
    assert fast.encode(text, stop=stop) == fast.encode(text)
    stop.set()
    with pytest.raises(EncodingStopped):
        fast.encode(text, stop=stop)
