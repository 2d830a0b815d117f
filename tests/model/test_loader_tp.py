"""Tensor-parallel loading: each rank reads exactly its slice of every sharded tensor.

Oracle: the whole model loaded from the same fresh random checkpoint (HF and Mistral-native
layouts); a rank's weights must equal the Megatron slices of the whole ones. No collectives
run while loading, so ranks are built in this process with a stand-in group.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistralpy.checkpoint import loader
from mistralpy.checkpoint.loader import load_model
from mistralpy.model.config import read_config
from mistralpy.model.parallel import ParallelConfig, split_heads
from mistralpy.testing import tiny_checkpoint
from tests.model.test_loader import _to_native
from tests.seeds import fresh_seeds

SEED = fresh_seeds(1, "loader-tp")[0]
SHARDED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("tiny-hf"), seed=SEED)


@pytest.fixture(scope="module")
def native_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-native") / "ckpt"
    _to_native(hf_dir, out)
    return out


@pytest.fixture(scope="module")
def whole(hf_dir):
    return load_model(hf_dir, torch.float32, "cpu")


def rank_of(rank: int, tp: int) -> ParallelConfig:
    return ParallelConfig(rank, tp, group=object())  # loading runs no collective


def expected_slices(whole, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Megatron slices of the whole model's decoder weights for `rank`."""
    text = whole.config.text_config
    d, inter = text.head_dim, text.intermediate_size // tp
    heads = split_heads(text.num_attention_heads, text.num_key_value_heads, rank_of(rank, tp))
    q_rows = slice(heads.q_start * d, (heads.q_start + heads.num_heads) * d)
    kv_rows = slice(heads.kv_start * d, (heads.kv_start + heads.num_kv_heads) * d)
    mlp_rows = slice(rank * inter, (rank + 1) * inter)
    vocab = text.vocab_size // tp
    out = {"lm_head.weight": whole.lm_head.weight[rank * vocab : (rank + 1) * vocab]}
    for i, layer in enumerate(whole.language_model.layers):
        pre = f"language_model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.weight.split(layer.self_attn.sizes)
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        out[pre + "self_attn.qkv_proj.weight"] = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])
        out[pre + "self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight[:, q_rows]
        out[pre + "mlp.gate_up_proj.weight"] = torch.cat([gate[mlp_rows], up[mlp_rows]])
        out[pre + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight[:, mlp_rows]
    return out


@pytest.mark.parametrize("layout", ["hf", "native"])
@pytest.mark.parametrize("tp", [2, 4])  # 4 > the 2 KV heads: each rank keeps a KV-head copy
def test_each_rank_holds_its_slice(request, whole, layout, tp):
    path = request.getfixturevalue(f"{layout}_dir")
    full = dict(whole.named_parameters())
    for rank in range(tp):
        model = load_model(path, torch.float32, "cpu", parallel=rank_of(rank, tp))
        want = expected_slices(whole, rank, tp)
        assert model.num_local_kv_heads == max(
            whole.config.text_config.num_key_value_heads // tp, 1
        )
        for name, param in model.named_parameters():
            if any(s in name for s in SHARDED) and not name.startswith("vision_tower"):
                torch.testing.assert_close(param, want.pop(name), atol=0, rtol=0, msg=name)
            else:  # replicated: embeddings, norms, vision tower, projector
                torch.testing.assert_close(param, full[name], atol=0, rtol=0, msg=name)
        assert not want, f"never checked: {sorted(want)}"


def test_isq_hook_sees_each_rank_shard(hf_dir, whole, monkeypatch):
    shapes: dict[str, tuple[int, ...]] = {}

    def isq_linear_factory(name):
        def factory(path, weight, bias):
            shapes[path] = tuple(weight.shape)
            return None

        return factory

    fake = types.ModuleType("mistralpy.quant.isq")
    fake.isq_linear_factory = isq_linear_factory
    monkeypatch.setitem(sys.modules, "mistralpy.quant.isq", fake)
    load_model(hf_dir, torch.float32, "cpu", isq="stub", parallel=rank_of(1, 2))
    want = {
        k.removesuffix(".weight"): tuple(v.shape) for k, v in expected_slices(whole, 1, 2).items()
    }
    assert {k: shapes[k] for k in want} == want
    vision_qkv = "vision_tower.transformer.layers.0.attention.qkv_proj"
    assert shapes[vision_qkv] == tuple(whole.get_submodule(vision_qkv).weight.shape)


def test_tied_lm_head_takes_its_embedding_rows(hf_dir, tmp_path):
    tied = tmp_path / "tied"
    tied.mkdir()
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors.pop("language_model.lm_head.weight")
    save_file(tensors, str(tied / "model.safetensors"))
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    embed = tensors["language_model.model.embed_tokens.weight"]
    rows = embed.shape[0] // 2
    model = load_model(tied, torch.float32, "cpu", parallel=rank_of(1, 2))
    assert torch.equal(model.lm_head.weight, embed[rows:])
    assert torch.equal(model.language_model.embed_tokens.weight, embed)


@pytest.mark.parametrize("block", [7, 256])  # 7: slices start and end inside seed blocks
@pytest.mark.parametrize("tp", [2, 4])
def test_dummy_ranks_hold_slices_of_the_tp1_dummy_model(hf_dir, tp, block, monkeypatch):
    """Dummy weights (benchmarks) are one model whatever the rank count: each rank's tensors
    equal the Megatron slices of the tp=1 dummy model (the same seed), drawn alone."""
    monkeypatch.setattr(loader, "DUMMY_BLOCK", block)
    config = read_config(hf_dir)
    whole = loader.load_dummy_model(config, torch.float32, "cpu", seed=SEED)
    full = dict(whole.named_parameters())
    for rank in range(tp):
        model = loader.load_dummy_model(
            config, torch.float32, "cpu", seed=SEED, parallel=rank_of(rank, tp)
        )
        want = expected_slices(whole, rank, tp)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, want.pop(name, full[name]), atol=0, rtol=0, msg=name)
        assert not want, f"never checked: {sorted(want)}"
    other = loader.load_dummy_model(config, torch.float32, "cpu", seed=SEED + 1)
    assert not torch.equal(other.lm_head.weight, whole.lm_head.weight)  # the seed matters
