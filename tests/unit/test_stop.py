"""Stop strings and finish reasons: incremental results vs a direct search on the full text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.engine.stop import StopChecker, StopStringMatcher, finish_reason_for_token
from mistralpy.params import SamplingParams

# A tiny alphabet makes overlaps, repeats and partial matches frequent.
small_text = st.text(alphabet="abc\n", max_size=4)


def cut_at_first_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """The oracle: full text cut at the leftmost occurrence of any stop string."""
    hits = [(text.find(s), k, s) for k, s in enumerate(stop) if s in text]
    if not hits:
        return text, None
    start, _, s = min(hits)
    return text[:start], s


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=4).map(tuple),
    st.lists(small_text, max_size=12),
)
def test_incremental_matches_oracle_and_never_leaks_stop_text(stop, deltas):
    matcher = StopStringMatcher(stop)
    emitted, fed = "", ""
    for delta in deltas:
        fed += delta
        update = matcher.update(delta)
        emitted += update.text
        # Whatever is released is a prefix of the final answer for the text fed so far.
        expected_so_far, _ = cut_at_first_stop(fed, stop)
        assert expected_so_far.startswith(emitted)
        if update.stop_string is not None:
            break
        # Only a possible beginning of a stop string is held back, nothing more.
        held = fed[len(emitted) :]
        assert held == "" or any(s.startswith(held) and s != held for s in stop)
    else:
        emitted += matcher.flush()
    expected, matched = cut_at_first_stop(fed, stop)
    assert emitted == expected == matcher.final_text
    assert matcher.stop_string == matched
    if matched is not None:
        assert fed.startswith(expected + matched)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=10))
def test_without_stop_strings_everything_streams_immediately(deltas):
    matcher = StopStringMatcher(())
    assert "".join(matcher.update(d).text for d in deltas) == "".join(deltas)
    assert matcher.flush() == ""


def test_stop_string_spanning_deltas_is_held_back_then_dropped():
    m = StopStringMatcher(("</end>",))
    assert m.update("hello </").text == "hello "
    assert m.update("en").text == ""
    upd = m.update("d> trailing")
    assert (upd.text, upd.stop_string) == ("", "</end>")
    assert m.final_text == "hello "


def test_partial_match_that_resolves_is_released():
    m = StopStringMatcher(("STOP",))
    assert m.update("ST").text == ""
    assert m.update("ART").text == "START"
    assert m.update("S").text == ""
    assert m.flush() == "S"


def test_earliest_stop_wins_and_ties_pick_the_first_listed():
    m = StopStringMatcher(("cd", "bcd", "b"))
    upd = m.update("abcd")
    assert (upd.text, upd.stop_string) == ("a", "bcd")


def test_finish_reasons():
    p = SamplingParams(max_tokens=3, stop_token_ids=(7,))
    fr = finish_reason_for_token
    assert fr(7, 1, 10, p, {2}, 100) == ("stop", 7)
    assert fr(2, 1, 10, p, {2}, 100) == ("stop", None)
    assert fr(5, 3, 10, p, {2}, 100) == ("length", None)
    assert fr(5, 2, 100, p, {2}, 100) == ("length", None)
    assert fr(5, 2, 10, p, {2}, 100) == (None, None)
    ignore = SamplingParams(ignore_eos=True)
    assert fr(2, 1, 10, ignore, {2}, 100) == (None, None)


def test_stop_checker_flushes_on_length_and_prefers_stop_strings():
    checker = StopChecker(SamplingParams(max_tokens=2, stop=("xy",)), {2}, 100)
    first = checker.step(5, "ax", 1, 5)
    assert (first.text, first.finish_reason) == ("a", None)
    last = checker.step(6, "b", 2, 6)
    assert (last.text, last.finish_reason) == ("xb", "length")
    checker = StopChecker(SamplingParams(max_tokens=2, stop=("xy",)), {2}, 100)
    checker.step(5, "ax", 1, 5)
    hit = checker.step(6, "yz", 2, 6)
    assert (hit.text, hit.finish_reason, hit.stop_reason) == ("", "stop", "xy")
    assert checker.strings.final_text == "a"
