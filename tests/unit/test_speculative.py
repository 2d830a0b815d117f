"""Drafters and speculative configuration (pure; no model)."""

from __future__ import annotations

import pytest

from mistralpy.engine.sequence import Sequence
from mistralpy.engine.speculative import (
    MAX_DRAFT_PAUSE,
    SHADOW_AFTER_MISSES,
    NgramDrafter,
    OracleDrafter,
    SpeculativeConfig,
    draft_pause,
    legacy_speculative_config,
    parse_speculative_config,
    shadow_checking,
)
from mistralpy.params import InvalidParameter, SamplingParams


def naive_ngram(ids, k, max_n, min_n):
    """Oracle: try every n from long to short, scan every earlier start from the latest."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(ids):
            continue
        suffix = ids[len(ids) - n :]
        for start in reversed(range(len(ids) - n)):
            if ids[start : start + n] == suffix:
                return ids[start + n : start + n + k]
    return []


def test_ngram_continues_latest_match_of_longest_suffix():
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix [2, 3] occurs at 1 and 5; the latest one (5) is followed by 7, 8, 5
    assert NgramDrafter(4, 2).propose("s", ids, 3) == [7, 8, 5]
    assert NgramDrafter(4, 2).propose("s", [1, 2, 3, 4], 3) == []  # nothing repeats
    assert NgramDrafter(3, 1).propose("s", [5, 6, 5], 4) == [6, 5]  # the draft may run to the end


def test_ngram_matches_naive_oracle_on_random_sequences():
    import random

    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        max_n = rng.randrange(1, 5)
        min_n = rng.randrange(1, max_n + 1)
        k = rng.randrange(1, 6)
        assert NgramDrafter(max_n, min_n).propose("s", ids, k) == naive_ngram(ids, k, max_n, min_n)


def test_oracle_drafter_alpha_bounds():
    truth = list(range(100, 140))
    exact = OracleDrafter(3, truth, 1.0, 1000, seed=1)
    assert exact.propose("s", [0, 0, 0, 100, 101], 4) == [102, 103, 104, 105]
    wrong = OracleDrafter(3, truth, 0.0, 1000, seed=1)
    draft = wrong.propose("s", [0, 0, 0], 40)
    assert len(draft) == 40 and all(d != t for d, t in zip(draft, truth))
    half = OracleDrafter(0, truth * 50, 0.5, 1000, seed=2).propose("s", [], 2000)
    right = sum(d == t for d, t in zip(half, truth * 50)) / 2000
    assert 0.45 < right < 0.55


def test_draft_pause_backs_off_exponentially():
    assert [draft_pause(m) for m in range(9)] == [0, 0, 1, 3, 7, 7, 7, 7, 7]
    assert [draft_pause(m, max_pause=63) for m in range(9)] == [0, 0, 1, 3, 7, 15, 31, 63, 63]
    assert [draft_pause(m, max_pause=0) for m in range(9)] == [0] * 9


def test_a_sequence_checks_its_drafter_for_free_after_misses():
    # three misses in a row (and a new sequence, which starts there) check the drafter on
    # plain steps instead of verifying drafts; with the policy off every step verifies
    assert [shadow_checking(m) for m in range(6)] == [False, False, False, True, True, True]
    assert [shadow_checking(m, max_pause=0) for m in range(6)] == [False] * 6
    assert Sequence("s", [1, 2], SamplingParams(), arrival=0, max_tokens=8, seed=0,
                    max_draft_pause=MAX_DRAFT_PAUSE).draft_misses == SHADOW_AFTER_MISSES  # fmt: skip


def test_parse_speculative_config_vllm_forms():
    cfg = parse_speculative_config(
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
    )
    assert cfg == SpeculativeConfig("ngram", 4, 4, 4)
    assert parse_speculative_config(None) is None
    legacy = legacy_speculative_config("[ngram]", 3)
    assert legacy is not None and legacy.num_speculative_tokens == 3
    assert legacy_speculative_config(None, None) is None
    draft = parse_speculative_config({"model": "/models/draft", "num_speculative_tokens": 3})
    assert draft == SpeculativeConfig("draft_model", 3, model="/models/draft")
    explicit = '{"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 3}'
    assert parse_speculative_config(explicit) == draft
    assert legacy_speculative_config("/models/draft", 3) == draft


@pytest.mark.parametrize(
    "value, words",
    [
        ("{not json", "speculative_config"),
        ('{"method": "eagle"}', "method"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": "4"}', "num_speculative_tokens"),
        ('{"method": "ngram", "prompt_lookup_max": 2, "prompt_lookup_min": 3}', "prompt_lookup"),
        ('{"method": "ngram", "typo": 1}', "typo"),
        ('{"method": "ngram", "model": "/models/draft"}', "draft_model"),
        ('{"method": "draft_model", "num_speculative_tokens": 4}', "model"),
        ('{"model": "", "num_speculative_tokens": 4}', "model"),
        ('{"num_speculative_tokens": 4}', "method"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_invalid_speculative_config_names_the_problem(value, words):
    with pytest.raises(InvalidParameter, match=words):
        parse_speculative_config(value)


def test_legacy_tokens_without_model_is_an_error():
    with pytest.raises(InvalidParameter, match="speculative-model"):
        legacy_speculative_config(None, 4)


def test_cli_flags_vllm_forms_and_errors():
    from mistralpy.server.cli import build_parser, engine_config

    parser = build_parser()

    def parsed(*flags):
        return engine_config(parser.parse_args(["serve", *flags])).speculative_config

    new = parsed("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    assert new == SpeculativeConfig("ngram", 3, 5, 5)
    old = parsed("--speculative-model", "[ngram]", "--num-speculative-tokens", "2")
    assert old is not None and old.num_speculative_tokens == 2
    assert parsed() is None
    draft = SpeculativeConfig("draft_model", 4, 5, 5, model="/models/draft")
    assert parsed("--speculative-model", "/models/draft") == draft
    assert parsed("--speculative-config", '{"model": "/models/draft"}') == draft
    from mistralpy.engine.config import EngineConfig

    with pytest.raises(InvalidParameter, match="tensor_parallel_size 1"):
        EngineConfig(speculative_config=draft, tensor_parallel_size=2)
    with pytest.raises(SystemExit, match="not both"):
        parsed("--speculative-config", '{"method": "ngram"}', "--speculative-model", "[ngram]")


def test_usage_and_prometheus_counters():
    from types import SimpleNamespace

    from mistralpy.api.chat import usage_dict
    from mistralpy.server.app import ServerMetrics

    metrics = SimpleNamespace(
        arrival_time=0.0,
        first_scheduled_time=0.0,
        first_token_time=0.5,
        finished_time=1.0,
        num_drafts=4,
        num_draft_tokens=16,
        num_accepted_tokens=12,
    )
    usage = usage_dict(10, 20, metrics)
    assert usage["speculative"] == {
        "num_drafts": 4,
        "num_draft_tokens": 16,
        "num_accepted_tokens": 12,
        "acceptance_rate": 0.75,
        "mean_acceptance_length": 4.0,
    }
    plain = SimpleNamespace(**{**vars(metrics), "num_drafts": 0})
    assert "speculative" not in usage_dict(10, 20, plain)
    server = ServerMetrics(None)
    server.record_usage(usage)
    server.record_usage(usage_dict(10, 20, plain))
    text = server.render().decode()
    assert "mistralpy_spec_decode_num_draft_tokens_total 16.0" in text
    assert "mistralpy_spec_decode_num_accepted_tokens_total 12.0" in text
    assert "mistralpy_spec_decode_num_drafts_total 4.0" in text
