"""SamplingParams validation: bad values are InvalidParameter naming the field, never other errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.params import GrammarSpec, InvalidParameter, SamplingParams

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(
        st.one_of(st.integers(-5, 10**6), st.text(max_size=3)), st.floats(), max_size=3
    ),
    st.tuples(st.text(max_size=3)),
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(FIELDS), anything)
def test_any_value_is_accepted_or_rejected_with_invalid_parameter(name, value):
    try:
        SamplingParams(**{name: value})
    except InvalidParameter as e:
        assert e.param == name
        assert name in str(e)


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0.0),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
        ("n", 0),
        ("n", True),
        ("max_tokens", 0),
        ("top_logprobs", 21),
        ("stop", "abc"),
        ("stop", ("",)),
        ("stop", tuple(str(i) for i in range(17))),
        ("stop_token_ids", (-1,)),
        ("seed", 1.5),
        ("grammar", "json"),
        ("temperature", 10**400),
    ],
)
def test_invalid_values_raise_invalid_parameter(name, value):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(**{name: value})
    assert info.value.param == name
    assert isinstance(info.value, ValueError)


def test_valid_values_and_normalisation():
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[2], temperature=0, top_k=-1)
    assert p.stop == ("a", "bc") and p.stop_token_ids == (2,)
    assert p.greedy
    hash(p.stop)


def test_check_vocab_rejects_out_of_range_bias():
    p = SamplingParams(logit_bias={10: 1.0})
    p.check_vocab(11)
    with pytest.raises(InvalidParameter) as info:
        p.check_vocab(10)
    assert info.value.param == "logit_bias"


def test_grammar_spec_kind_is_validated():
    GrammarSpec("regex", "a+")
    with pytest.raises(InvalidParameter):
        GrammarSpec("yaml", "x")
