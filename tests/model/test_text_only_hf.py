"""Text-only decoders in Hugging Face layout (LlamaForCausalLM, MistralForCausalLM) load into the
same decoder and match transformers on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

from mistralpy.checkpoint.loader import load_model
from mistralpy.model.config import read_config
from mistralpy.testing.probes import prefill_logits
from tests.seeds import fresh_seeds


def _tiny(kind: str, seed: int, tie: bool):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rope_theta=50000.0, tie_word_embeddings=tie)  # fmt: skip
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.MistralForCausalLM(transformers.MistralConfig(head_dim=16, **common))


@pytest.mark.parametrize("kind,tie", [("llama", True), ("mistral", False)])
@pytest.mark.parametrize("seed", fresh_seeds(1, "text_only_hf"))
def test_text_only_checkpoint_matches_transformers(tmp_path, kind, tie, seed):
    hf = _tiny(kind, seed, tie).eval()
    hf.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config.vision_config is None and config.tie_word_embeddings == tie
    ours = load_model(tmp_path, torch.float32, "cpu")
    ids = torch.randint(0, 200, (17,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (prefill_logits(ours, ids) - theirs).abs().max() <= 1e-4 * theirs.abs().max()
