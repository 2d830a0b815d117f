"""What the runner calls on the model it drives, as a type.

`model.mistral3.Mistral3ForConditionalGeneration` is the model; the tensor-parallel driver
wraps it (runner.distributed), and tests drive stand-ins. The runner depends on these
members only, so any of them can stand in without being an nn.Module subclass of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from mistralpy.kernels.attention import AttentionMetadata, PagedAttentionFn, VarlenAttentionFn
from mistralpy.kernels.fused_ops import LayerOps
from mistralpy.model.config import Mistral3Config


class RunnerModel(Protocol):
    """One model step and its setup hooks; shapes as in Mistral3ForConditionalGeneration."""

    @property
    def config(self) -> Mistral3Config: ...

    def __call__(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn: AttentionMetadata,
        kv_caches: list[Tensor],
        image_embeds: Tensor | None = None,
    ) -> Tensor:
        """input_ids / positions (T,) int64 -> hidden (T, text_hidden)."""
        ...

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """input_ids (T,) int64 -> input embeddings (T, text_hidden)."""
        ...

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden (N, text_hidden) -> logits (N, vocab) float32."""
        ...

    def encode_images(self, pixel_values: list[Tensor]) -> list[Tensor]:
        """Images (3, H, W) -> per image (rows*cols, text_hidden) embeddings."""
        ...

    def set_kv_scales(self, scales: list[Tensor]) -> None:
        """The fp8 KV cache's per-layer (k_scale, v_scale), once, at setup."""
        ...

    def set_attention_backend(
        self, attn_fn: PagedAttentionFn, varlen_fn: VarlenAttentionFn | None = None
    ) -> None:
        """The paged-attention kernel (and the vision tower's varlen one), once, at setup."""
        ...

    def set_layer_ops(self, ops: LayerOps) -> None:
        """Norm / activation / RoPE kernels of every layer, once, at setup."""
        ...


if TYPE_CHECKING:  # mypy proves here that the real model has every member above
    from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration

    def _conforms(model: Mistral3ForConditionalGeneration) -> RunnerModel:
        return model
