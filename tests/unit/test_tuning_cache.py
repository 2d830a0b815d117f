"""The kernel tuning cache: picks timed once per machine and software, read back by later
loads, never trusted across a context change or from a damaged file."""

from __future__ import annotations

import json

import torch

from mistralpy.kernels import triton_quant as tq
from mistralpy.quant.isq import isq_linear_factory
from mistralpy.quant.tuning import KernelTuning, TuningStore, default_cache_path, to_json

GEMV = tq.GemvConfig(16, 1, 1, split=4, x_inline=True)
GEMM = {2: tq.GemmConfig(64, 1, 4, 1, 4, mma=True), 16: tq.GemmConfig(64, 1, 4, 2, 4)}


class Tuner:
    """A tuner that counts its calls and returns `value`."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_second_load_reads_the_picks_back_without_timing(tmp_path):
    path = tmp_path / "cache" / "kernel_tuning.json"
    first, second = Tuner(GEMV), Tuner(GEMM)
    tuning = KernelTuning(TuningStore(path, lambda: "H100 sm90 torch x"))
    assert tuning.get(("q4k", (6144, 5120)), first, tq.gemv_config_of) == GEMV
    assert tuning.get(("q4k-gemm", (6144, 5120)), second, tq.gemm_configs_of) == GEMM
    assert tuning.get(("q4k", (6144, 5120)), first, tq.gemv_config_of) == GEMV  # memoised
    assert (first.calls, second.calls) == (1, 1)
    again = KernelTuning(TuningStore(path, lambda: "H100 sm90 torch x"))
    never = Tuner(None)
    assert again.get(("q4k", (6144, 5120)), never, tq.gemv_config_of) == GEMV
    assert again.get(("q4k-gemm", (6144, 5120)), never, tq.gemm_configs_of) == GEMM
    assert never.calls == 0
    # another shape, another card: timed
    assert again.get(("q4k", (5120, 4096)), Tuner(GEMV), tq.gemv_config_of) == GEMV
    other = KernelTuning(TuningStore(path, lambda: "L4 sm89 torch x"))
    tuner = Tuner(tq.GemvConfig(8, 1, 1))
    assert other.get(("q4k", (6144, 5120)), tuner, tq.gemv_config_of) == tuner.value
    assert tuner.calls == 1
    # both contexts' picks are kept
    assert len(json.loads(path.read_text())["contexts"]) == 2


def test_a_pick_of_none_is_a_pick():
    # fp8: None means "W8A8 is faster": stored and read back, not timed again
    store = {}

    class Memory(TuningStore):
        def get(self, key):
            return store.get(key)

        def put(self, key, data):
            store[key] = {"config": data}

    KernelTuning(Memory(None)).get(("fp8", (4, 4)), Tuner(None), tq.fp8_gemv_config_of)
    tuner = Tuner((64, 4))
    assert KernelTuning(Memory(None)).get(("fp8", (4, 4)), tuner, tq.fp8_gemv_config_of) is None
    assert tuner.calls == 0
    assert tq.fp8_gemv_config_of(to_json((64, 4))) == (64, 4)


def test_a_damaged_or_foreign_file_is_timed_again_and_rewritten(tmp_path):
    path = tmp_path / "kernel_tuning.json"
    for text in ("{not json", json.dumps([1, 2]), json.dumps({"format": 99, "contexts": {}})):
        path.write_text(text)
        tuner = Tuner(GEMV)
        assert (
            KernelTuning(TuningStore(path, lambda: "c")).get(
                ("q4k", (8, 256)), tuner, tq.gemv_config_of
            )
            == GEMV
        )
        assert tuner.calls == 1
        assert json.loads(path.read_text())["format"] == 1
    # an entry whose fields this code does not know (an older or newer GemvConfig)
    data = json.loads(path.read_text())
    (entries,) = data["contexts"].values()
    (key,) = entries
    entries[key] = {"config": {"bn": 8, "no_such_field": 1}}
    path.write_text(json.dumps(data))
    tuner = Tuner(GEMV)
    got = KernelTuning(TuningStore(path, lambda: "c")).get(("q4k", (8, 256)), tuner,
                                                           tq.gemv_config_of)  # fmt: skip
    assert got == GEMV and tuner.calls == 1


def test_an_unwritable_cache_only_logs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    tuning = KernelTuning(TuningStore(blocker / "sub" / "kernel_tuning.json", lambda: "c"))
    assert tuning.get(("q4k", (8, 256)), Tuner(GEMV), tq.gemv_config_of) == GEMV


def test_the_cache_path_follows_the_environment(monkeypatch, tmp_path):
    # the same directory as the named models' files
    monkeypatch.delenv("MISTRALPY_TUNING_CACHE", raising=False)
    monkeypatch.setenv("MISTRALPY_CACHE", str(tmp_path / "m"))
    assert default_cache_path() == tmp_path / "m" / "kernel_tuning.json"
    monkeypatch.delenv("MISTRALPY_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "mistralpy" / "kernel_tuning.json"
    monkeypatch.setenv("MISTRALPY_TUNING_CACHE", "0")
    assert default_cache_path() is None


def test_a_cpu_load_never_opens_the_default_store(monkeypatch, tmp_path):
    # the default store opens on the first pick not memoised; nothing is tuned on CPU
    monkeypatch.setenv("MISTRALPY_CACHE", str(tmp_path))
    factory = isq_linear_factory("q4k")
    weight = torch.randn(64, 512)
    layer = factory("model.layers.0.mlp.down_proj", weight, None)
    assert layer is not None and layer(torch.randn(2, 512)).shape == (2, 64)
    assert not any(tmp_path.iterdir())
