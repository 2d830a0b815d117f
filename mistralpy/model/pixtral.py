"""Pixtral vision encoder: patch conv, 2-D RoPE, pre-norm transformer blocks.

All images of a call are packed into one (N_patches, hidden) sequence: linear layers run once
over all patches; attention stays within each image (varlen segments, no dense mask).
Attribute names equal the HF checkpoint keys, except the fused `qkv_proj` / `gate_up_proj`.
"""

from __future__ import annotations

import torch
from torch import nn

from mistralpy.kernels.attention import VarlenAttentionFn, varlen_attention
from mistralpy.kernels.fused_ops import REFERENCE_OPS, LayerOps
from mistralpy.model.config import VisionConfig
from mistralpy.model.layers import (
    GatedMLP,
    MergedLinear,
    RMSNorm,
    rope_cos_sin,
    rope_inv_freq,
)


class PixtralAttention(nn.Module):
    """Bidirectional multi-head attention within each image."""

    ops: LayerOps = REFERENCE_OPS  # set per instance by the model's `set_layer_ops`
    varlen_fn: VarlenAttentionFn = staticmethod(varlen_attention)  # set_attention_backend

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.qkv_proj = MergedLinear(hidden, (hidden, hidden, hidden))
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        """x (N, hidden), cos/sin (N, head_dim) -> (N, hidden)."""
        q, k, v = self.qkv_proj(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.ops.rope_qk(q, k, cos, sin)
        out = self.varlen_fn(q, k, v, cu_seqlens, self.head_dim**-0.5)
        return self.o_proj(out.flatten(1))


class PixtralBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = PixtralAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size,
                                     config.hidden_act)  # fmt: skip

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        h, x = self.ffn_norm.add_forward(
            self.attention(self.attention_norm(x), cos, sin, cu_seqlens), x
        )
        return x + self.feed_forward(h)


class PixtralTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixtralBlock(config) for _ in range(config.num_hidden_layers))


class PixtralVisionModel(nn.Module):
    """Images -> per-patch features of the last layer (no final norm, as in Pixtral)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_conv = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=config.patch_size, stride=config.patch_size,
                                    bias=False)  # fmt: skip
        self.ln_pre = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.transformer = PixtralTransformer(config)

    def forward(
        self, pixel_values: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (3, H, W) -> packed features (sum h*w, hidden) and each patch grid (h, w).

        H and W are cropped down to multiples of the patch size, as transformers does.
        """
        dtype = self.patch_conv.weight.dtype
        # The conv runs per image (sizes differ); it is a small share of the encoder's work.
        grids = [self.patch_conv(img.to(dtype)[None])[0] for img in pixel_values]
        sizes = [(g.shape[1], g.shape[2]) for g in grids]
        x = self.ln_pre(torch.cat([g.flatten(1).t() for g in grids], dim=0))
        cos, sin = self._rope(sizes, x.device, x.dtype)
        cu_seqlens = [0]
        for h, w in sizes:
            cu_seqlens.append(cu_seqlens[-1] + h * w)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, cu_seqlens)
        return x, sizes

    def _rope(
        self, sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D RoPE tables (sum h*w, head_dim): rows use the even, columns the odd frequencies."""
        inv_freq = rope_inv_freq(self.config.rope_theta, self.config.head_dim, device)
        freqs = []
        for h, w in sizes:
            rows = (
                torch.arange(h, device=device).float()[:, None, None] * inv_freq[None, None, 0::2]
            )
            cols = (
                torch.arange(w, device=device).float()[None, :, None] * inv_freq[None, None, 1::2]
            )
            grid = torch.cat([rows.expand(h, w, -1), cols.expand(h, w, -1)], dim=-1)
            freqs.append(grid.reshape(h * w, -1))
        return rope_cos_sin(torch.cat(freqs, dim=0), dtype)
