"""local_model_path: local directories pass through; unknown ids fail fast offline."""

from __future__ import annotations

import time

import pytest

from mistralpy.checkpoint.hub import ModelNotFoundError, local_model_path


def test_local_directory_is_returned(tmp_path):
    assert local_model_path(str(tmp_path)) == tmp_path


def test_offline_unknown_id_fails_fast_naming_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        local_model_path("no-such-org/no-such-model-xyz", revision="main")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg
    assert "local directory" in msg and "hub repo" in msg and "HF_HUB_OFFLINE" in msg
    assert isinstance(err.value, ValueError)


def test_malformed_id_is_a_model_not_found_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not found"):
        local_model_path("not a valid//repo id")


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused


def test_unreachable_hub_says_offline_at_once_and_names_the_paths_tried(tmp_path, monkeypatch):
    """No network (here: a refused endpoint) is found out with one connect, not 5 retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        local_model_path("some-org/some-model")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert msg.startswith("offline: cannot reach the hub") and "127.0.0.1" in msg
    assert "some-model" in msg and str(tmp_path / "hub") in msg  # the cache looked in
    assert "local directory" in msg


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such", "a/b/c"])
def test_a_missing_path_is_not_a_hub_id(path, monkeypatch):
    import mistralpy.checkpoint.hub as hub

    def no_network():
        raise AssertionError("a path must not be looked up on the hub")

    monkeypatch.setattr(hub, "_hub_unreachable", no_network)
    with pytest.raises(ModelNotFoundError, match="no directory"):
        local_model_path(path)


def test_hub_gguf_fetches_every_shard_and_returns_the_given_file(tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []

    def download(repo_id, filename, revision=None, token=None, local_files_only=False):
        fetched.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    got = local_model_path("org/repo/q4/m-00001-of-00002.gguf", revision="r1")
    assert got == tmp_path / "q4/m-00001-of-00002.gguf"
    assert fetched == [
        ("org/repo", "q4/m-00001-of-00002.gguf", "r1"),
        ("org/repo", "q4/m-00002-of-00002.gguf", "r1"),
    ]
