"""GGUF loading on a tiny random llama written here with gguf's writer (no network).

The file is written as llama.cpp's converter writes one: q/k rows permuted into interleaved
RoPE order, F32 norms, a Q8_0 or F16 token embedding and Q8_0 / Q4_0 / F32 linears (a fused
projection whose parts differ in type included), no output.weight (tied embeddings). transformers
loads the same file (dequantized, float32) and is the oracle for the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from mistralpy.checkpoint.loader import CheckpointError, load_model
from mistralpy.model.config import ConfigError, read_config
from mistralpy.quant.formats import get_format
from mistralpy.quant.isq import ConcatLinear, QuantizedLinear
from mistralpy.testing.probes import prefill_logits
from tests.seeds import fresh_seeds

H, FF, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 300
D = H // HEADS


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved order (its converter's permutation)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _add(writer: GGUFWriter, name: str, w: np.ndarray, qtype: int) -> None:
    if qtype == T.F32:
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == T.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        fmt = get_format({T.Q8_0: "q8_0", T.Q4_0: "q4_0"}[qtype])
        packed = fmt.quantize(torch.from_numpy(w)).numpy()
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def write_tiny_gguf(path, seed: int, types: dict[str, int], arch: str = "llama", drop: str = ""):
    """A random llama GGUF; types: GGUF tensor kind ("attn_q", "token_embd", ...) -> type."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 2)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (VOCAB - 2))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rand = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    tensors = {"token_embd.weight": rand(VOCAB, H), "output_norm.weight": 1 + rand(H)}
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + rand(H),
            f"blk.{i}.ffn_norm.weight": 1 + rand(H),
            f"blk.{i}.attn_q.weight": _permute(rand(HEADS * D, H), HEADS),
            f"blk.{i}.attn_k.weight": _permute(rand(KV * D, H), KV),
            f"blk.{i}.attn_v.weight": rand(KV * D, H),
            f"blk.{i}.attn_output.weight": rand(H, HEADS * D),
            f"blk.{i}.ffn_gate.weight": rand(FF, H),
            f"blk.{i}.ffn_up.weight": rand(FF, H),
            f"blk.{i}.ffn_down.weight": rand(H, FF),
        }
    for name, value in tensors.items():
        if name == drop:
            continue
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        _add(w, name, value, types.get(kind, T.F32) if value.ndim == 2 else T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MIXED = {"token_embd": T.Q8_0, "attn_q": T.Q8_0, "attn_k": T.Q8_0, "attn_v": T.Q4_0,
         "attn_output": T.Q4_0, "ffn_gate": T.Q8_0, "ffn_up": T.Q8_0}  # fmt: skip


@pytest.mark.parametrize("seed", fresh_seeds(2, "gguf_tiny"))
def test_logits_match_transformers(tmp_path, seed):
    from transformers import AutoModelForCausalLM

    file = write_tiny_gguf(tmp_path / "tiny.gguf", seed, MIXED)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = prefill_logits(load_model(file, torch.float32, "cpu", dequantize=True), ids)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    stored = load_model(file, torch.float32, "cpu")
    layer = stored.language_model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, ConcatLinear)  # q8_0, q8_0, q4_0 parts
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    assert type(layer.mlp.down_proj) is not QuantizedLinear  # F32 in the file: dense
    assert isinstance(stored.lm_head, QuantizedLinear) and stored.lm_head.fmt.name == "q8_0"
    # the stored-format kernels compute the same products up to their own rounding
    assert (prefill_logits(stored, ids) - ours).abs().max() <= 0.05 * theirs.abs().max()


def test_isq_requantizes_and_f16_embedding(tmp_path):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", 1, {"token_embd": T.F16})
    model = load_model(file, torch.float32, "cpu", isq="q8_0")
    layer = model.language_model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear)
    assert layer.self_attn.qkv_proj.fmt.name == "q8_0"


def test_missing_tensor_is_a_clear_error(tmp_path):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", 2, {}, drop="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match="layers.1.mlp.gate_up_proj"):
        load_model(file, torch.float32, "cpu")


def test_unsupported_architecture_is_a_config_error(tmp_path):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", 3, {}, arch="qwen2")
    with pytest.raises(ConfigError, match="qwen2"):
        read_config(file)


def test_tekken_vocabulary_as_gguf_bpe(tmp_path):
    """A Tekken vocabulary written as llama.cpp writes Mistral's (gpt2 model, pre "tekken",
    byte-level tokens, merges, control types): encodes as mistral-common's Tekkenizer."""
    import json

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from mistralpy.processing.tokenizer import Tokenizer
    from mistralpy.testing.tiny_checkpoint import write_tokenizer_files

    src = write_tokenizer_files(tmp_path / "tok")
    hf = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {**hf["model"]["vocab"], **{t["content"]: t["id"] for t in hf["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in hf["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    w = GGUFWriter(str(tmp_path / "tekken.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_dir(tmp_path / "tekken.gguf")
    tekken = Tekkenizer.from_file(str(src / "tekken.json"))
    for text in ["Hello, world!", "  spaces\n\nand 12345 digits", "naïve café 東京 😀 [INST]"]:
        assert ours.encode(text) == tekken.encode(text, bos=False, eos=False), text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_token_id, ours.eos_token_id) == (tekken.bos_id, tekken.eos_id)
