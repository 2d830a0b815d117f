"""Read-outs of a model for tests and benchmarks, outside the engine."""

from __future__ import annotations

import torch

from mistralpy.kernels.attention import KVCacheSpec, allocate_kv_caches, build_metadata
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration


def prefill_logits(
    model: Mistral3ForConditionalGeneration, ids: list[int], block: int = 16
) -> torch.Tensor:
    """(T, vocab) float32 logits of one prefill of `ids` through a fresh paged cache."""
    emb = model.language_model.embed_tokens.weight
    blocks = -(-len(ids) // block)
    caches = allocate_kv_caches(
        KVCacheSpec.of_text(model.config.text_config, block, emb.dtype), blocks, emb.device
    )
    attn = build_metadata([len(ids)], [len(ids)], [list(range(blocks))], block, emb.device)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), attn, caches, None)
        return model.compute_logits(hidden)
