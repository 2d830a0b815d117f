"""Read-outs of a model for tests and benchmarks, outside the engine."""

from __future__ import annotations

import torch

from mistralpy.kernels.attention import KVCacheSpec, allocate_kv_caches, build_metadata
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration


@torch.inference_mode()
def prefill_logits(
    model: Mistral3ForConditionalGeneration,
    ids: list[int],
    images: list[torch.Tensor] | None = None,
    block_size: int = 16,
) -> torch.Tensor:
    """(T, vocab) float32 logits of one prefill of `ids` (with `images`' pixel values for
    its [IMG] runs) through a fresh paged cache."""
    norm = model.language_model.norm.weight  # embedding and lm_head may be quantized
    device, n = norm.device, len(ids)
    blocks = -(-n // block_size)
    spec = KVCacheSpec.of_text(model.config.text_config, block_size, norm.dtype)
    caches = allocate_kv_caches(spec, blocks, device)
    attn = build_metadata([n], [n], [list(range(blocks))], block_size, device)
    embeds = torch.cat(model.encode_images(images)) if images else None
    ids_t = torch.tensor(ids, device=device)
    hidden = model(ids_t, torch.arange(n, device=device), attn, caches, embeds)
    return model.compute_logits(hidden)
