"""resolve_model_path: local directories pass through; unknown ids fail fast offline."""

from __future__ import annotations

import time

import pytest

from mistralpy.checkpoint.hub import ModelNotFoundError, resolve_model_path


def test_local_directory_is_returned(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_offline_unknown_id_fails_fast_naming_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("no-such-org/no-such-model-xyz", revision="main")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg
    assert "local directory" in msg and "hub repo" in msg and "HF_HUB_OFFLINE" in msg
    assert isinstance(err.value, ValueError)


def test_malformed_id_is_a_model_not_found_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path("not a valid//repo id")
