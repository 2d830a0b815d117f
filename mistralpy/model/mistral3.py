"""Mistral Small 3.1 (HF `mistral3`): Pixtral encoder + patch-merging projector + Mistral decoder.

The model is a pure function of its inputs: token ids, absolute positions, per-layer paged KV
caches and `AttentionMetadata`. It knows nothing of schedulers or CUDA graphs. The attention
backend (a `PagedAttentionFn`) is chosen once, at construction or by `set_attention_backend`.
Attribute names equal the HF checkpoint keys except the fused `qkv_proj` and `gate_up_proj`
(see `packed_modules_mapping`).
"""

from __future__ import annotations

import torch
from torch import nn

from mistralpy.kernels.attention import (
    AttentionMetadata,
    KVCacheSpec,
    PagedAttentionFn,
    RopePagedAttentionFn,
    VarlenAttentionFn,
    allocate_kv_caches,
    build_metadata,
    paged_attention,
)
from mistralpy.kernels.fused_ops import REFERENCE_OPS, LayerOps
from mistralpy.model.config import Mistral3Config, TextConfig
from mistralpy.model.layers import (
    GatedMLP,
    MergedLinear,
    RMSNorm,
    activation,
    text_rope,
)
from mistralpy.model.parallel import SINGLE, ParallelConfig, Shard, set_shards, split_heads
from mistralpy.model.pixtral import PixtralAttention, PixtralVisionModel


class MistralAttention(nn.Module):
    """GQA self-attention with RoPE over the paged KV cache.

    Under tensor parallelism a rank holds only its query/KV heads (see model.parallel):
    qkv_proj is column parallel, o_proj row parallel followed by an all-reduce.
    """

    ops: LayerOps = REFERENCE_OPS  # set per instance by `set_layer_ops`

    def __init__(
        self, config: TextConfig, attn_fn: PagedAttentionFn, parallel: ParallelConfig = SINGLE
    ) -> None:
        super().__init__()
        heads = split_heads(config.num_attention_heads, config.num_key_value_heads, parallel)
        d = config.head_dim
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = d
        self.sizes = [heads.num_heads * d, heads.num_kv_heads * d, heads.num_kv_heads * d]
        q_rows = Shard(0, heads.q_start * d, self.sizes[0], config.q_size)
        kv_rows = Shard(0, heads.kv_start * d, self.sizes[1], config.kv_size)
        self.qkv_proj = MergedLinear(config.hidden_size, tuple(self.sizes))
        set_shards(self.qkv_proj, q_rows, kv_rows, kv_rows)
        self.o_proj = nn.Linear(self.sizes[0], config.hidden_size, bias=False)
        set_shards(self.o_proj, Shard(1, q_rows.start, q_rows.size, q_rows.full))
        self.scale = config.head_dim**-0.5
        self.attn_fn = attn_fn
        # set by `set_attention_backend` where the backend fuses RoPE into its K/V store (one
        # launch fewer per layer); it then replaces `ops.rope_qk` + `attn_fn`
        self.rope_attn_fn: RopePagedAttentionFn | None = None
        # (k_scale, v_scale) float32 of an fp8 KV cache, on the cache's device (vLLM's
        # k_scale / v_scale); set by `set_kv_scales`. Not a buffer: it belongs to the cache the
        # runner allocates, not to the checkpoint. None: a cache in the model dtype.
        self.kv_scale: torch.Tensor | None = None
        self.parallel = parallel

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """x (T, hidden), cos/sin (T, head_dim) -> (T, hidden); writes this step's K/V."""
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.rope_attn_fn is not None:
            out = self.rope_attn_fn(q, k, v, cos, sin, kv_cache, attn, self.scale, self.kv_scale)
        else:
            q, k = self.ops.rope_qk(q, k, cos, sin)
            out = self.attn_fn(q, k, v, kv_cache, attn, self.scale, self.kv_scale)
        return self.parallel.all_reduce(self.o_proj(out.flatten(1)))


class MistralDecoderLayer(nn.Module):
    def __init__(
        self, config: TextConfig, attn_fn: PagedAttentionFn, parallel: ParallelConfig = SINGLE
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MistralAttention(config, attn_fn, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, parallel
        )

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        next_norm: RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(residual), residual (T, hidden) -> the same pair for the next
        layer, whose input norm `next_norm` is fused with this layer's last residual add
        (numerically the same as x + attn(norm(x)), then x + mlp(norm(x)))."""
        h, residual = self.post_attention_layernorm.add_forward(
            self.self_attn(h, cos, sin, kv_cache, attn), residual
        )
        return next_norm.add_forward(self.mlp(h), residual)


class MistralModel(nn.Module):
    """Token embeddings, decoder layers, final norm (no lm_head)."""

    def __init__(
        self, config: TextConfig, attn_fn: PagedAttentionFn, parallel: ParallelConfig = SINGLE
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MistralDecoderLayer(config, attn_fn, parallel) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """embeds (T, hidden), positions (T,) -> normed hidden states (T, hidden)."""
        cos, sin = text_rope(positions, self.config.rope_theta, self.config.head_dim, embeds.dtype)
        # each layer's last residual add is fused with the next norm (the final one at the end)
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        first = self.layers[0]
        assert isinstance(first, MistralDecoderLayer)
        h, residual = first.input_layernorm(embeds), embeds
        for layer, kv_cache, next_norm in zip(self.layers, kv_caches, norms, strict=True):
            h, residual = layer(h, residual, cos, sin, kv_cache, attn, next_norm)
        return h


class PatchMerger(nn.Module):
    """Concatenates each merge x merge patch neighbourhood, then projects back to hidden."""

    def __init__(self, hidden_size: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden_size * merge * merge, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """x (sum h*w, d) packed per image in row-major patch order -> (sum h'*w', d).

        Feature order of a merged token is (channel, row-in-window, col-in-window), the order
        of torch's `unfold` that transformers uses; leftover rows/cols are dropped like unfold.
        """
        m, d = self.merge, x.shape[-1]
        merged: list[torch.Tensor] = []
        for grid, (h, w) in zip(x.split([h * w for h, w in sizes]), sizes, strict=True):
            grid = grid.view(h, w, d)[: h // m * m, : w // m * m]
            grid = grid.reshape(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3)
            merged.append(grid.reshape((h // m) * (w // m), d * m * m))
        return self.merging_layer(torch.cat(merged, dim=0))


class Mistral3MultiModalProjector(nn.Module):
    """RMSNorm -> patch merger -> linear_1 -> act -> linear_2 (vision hidden -> text hidden)."""

    def __init__(self, config: Mistral3Config) -> None:
        super().__init__()
        assert config.vision_config is not None, "a projector needs a vision tower"
        vision_hidden = config.vision_config.hidden_size
        text_hidden = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.norm = RMSNorm(vision_hidden, config.text_config.rms_norm_eps)
        self.patch_merger = PatchMerger(vision_hidden, config.spatial_merge_size)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """features (sum h*w, vision_hidden) -> (sum h'*w', text_hidden)."""
        merged = self.patch_merger(self.norm(features), sizes)
        return self.linear_2(self.act(self.linear_1(merged)))


class Mistral3ForConditionalGeneration(nn.Module):
    """The whole model; see docs/ARCHITECTURE.md "Model" for the contract."""

    # checkpoint projection name -> (our fused module name, part index); used by the loader.
    packed_modules_mapping: dict[str, tuple[str, int]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: Mistral3Config,
        attn_fn: PagedAttentionFn | None = None,
        parallel: ParallelConfig = SINGLE,
    ) -> None:
        """parallel: this copy's tensor-parallel rank; the vision tower and projector stay
        whole on every rank, the decoder is split (see model.parallel)."""
        super().__init__()
        self.config = config
        self.parallel = parallel
        # a text-only config (llama / mistral decoders) has neither
        self.vision_tower: PixtralVisionModel | None = None
        self.multi_modal_projector: Mistral3MultiModalProjector | None = None
        if config.vision_config is not None:
            self.vision_tower = PixtralVisionModel(config.vision_config)
            self.multi_modal_projector = Mistral3MultiModalProjector(config)
        text = config.text_config
        self.language_model = MistralModel(text, attn_fn or paged_attention, parallel)
        self.vocab_parallel = parallel.world_size > 1 and text.vocab_size % parallel.world_size == 0
        # an nn.Linear, until ISQ or a GGUF load swaps in a QuantizedLinear (any (.., H) -> (.., V))
        self.lm_head: nn.Module = _lm_head(
            text.hidden_size, text.vocab_size, parallel, self.vocab_parallel
        )

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank's cache holds (all of them without tensor parallelism)."""
        return _attention(self.language_model.layers[0]).num_kv_heads

    def set_attention_backend(
        self,
        attn_fn: PagedAttentionFn,
        varlen_fn: VarlenAttentionFn | None = None,
        rope_attn_fn: RopePagedAttentionFn | None = None,
    ) -> None:
        """Use `attn_fn` for every decoder layer's paged attention and, if given, `varlen_fn`
        for the vision encoder's per-image attention (call once, at setup). `rope_attn_fn`:
        the same backend with RoPE fused into its K/V store, used by the decoder layers in
        place of the layer ops' `rope_qk` and `attn_fn` (None: those two)."""
        for layer in self.language_model.layers:
            _attention(layer).attn_fn = attn_fn
            _attention(layer).rope_attn_fn = rope_attn_fn
        if varlen_fn is not None and self.vision_tower is not None:
            for module in self.vision_tower.modules():
                if isinstance(module, PixtralAttention):
                    module.varlen_fn = varlen_fn

    def set_kv_scales(self, scales: list[torch.Tensor]) -> None:
        """Layer i's fp8 KV cache holds K / scales[i][0] and V / scales[i][1] (each (2,)
        float32 on the cache's device; call once, at setup, as the cache is allocated)."""
        layers = self.language_model.layers
        assert len(scales) == len(layers), "one (k_scale, v_scale) pair per decoder layer"
        for layer, kv_scale in zip(layers, scales):
            _attention(layer).kv_scale = kv_scale

    def set_layer_ops(self, ops: LayerOps) -> None:
        """Use `ops` (norms, SiLU-and-mul, RoPE) in every layer of both towers (once, at setup)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, GatedMLP, MistralAttention, PixtralAttention)):
                module.ops = ops

    def encode_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images (3, H, W) -> per image (rows*cols, text_hidden) embeddings, in one pass."""
        if not pixel_values:
            return []
        if self.vision_tower is None or self.multi_modal_projector is None:
            raise ValueError("this model is text-only: it has no vision encoder for images")
        features, sizes = self.vision_tower(pixel_values)
        embeds = self.multi_modal_projector(features, sizes)
        m = self.config.spatial_merge_size
        return list(embeds.split([(h // m) * (w // m) for h, w in sizes]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/positions (T,) int64 -> hidden (T, text_hidden).

        image_embeds (N, text_hidden) replace, in order, the N tokens equal to
        config.image_token_index (the caller guarantees the counts match).
        """
        embeds = self.embed_tokens(input_ids)
        if image_embeds is not None and self.config.image_token_index is not None:
            mask = (input_ids == self.config.image_token_index)[:, None]
            embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
        return self.language_model(embeds, positions, attn, kv_caches)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) int64 -> the decoder's input embeddings (T, text_hidden)."""
        return self.language_model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, text_hidden) -> logits (N, vocab) float32 (on every rank)."""
        logits = self.lm_head(hidden)
        if self.vocab_parallel:
            logits = self.parallel.gather_last_dim(logits)
        return logits.float()


def _lm_head(hidden: int, vocab: int, parallel: ParallelConfig, split: bool) -> nn.Linear:
    """Vocab-parallel lm_head (V/tp rows per rank) if `split`, else a whole one on each rank."""
    if not split:
        return nn.Linear(hidden, vocab, bias=False)
    rows = vocab // parallel.world_size
    return set_shards(
        nn.Linear(hidden, rows, bias=False), Shard(0, parallel.rank * rows, rows, vocab)
    )


def _attention(layer: nn.Module) -> MistralAttention:
    """A decoder layer's attention (nn.ModuleList types its items as plain Modules)."""
    attn = layer.self_attn
    assert isinstance(attn, MistralAttention), type(attn)
    return attn


@torch.inference_mode()
def greedy_generate(
    model: Mistral3ForConditionalGeneration,
    prompt_ids: list[int],
    max_new_tokens: int,
    images: list[torch.Tensor] | None = None,
    block_size: int = 16,
) -> list[int]:
    """Greedy continuation of one prompt (prefill, then decode one token at a time).

    A quick-generation helper for tests and smoke checks; the engine does the real batching.
    """
    device = model.language_model.norm.weight.device  # the embedding may be quantized
    dtype = model.language_model.norm.weight.dtype
    total = len(prompt_ids) + max_new_tokens
    num_blocks = -(-total // block_size)
    spec = KVCacheSpec.of_text(model.config.text_config, block_size, dtype)
    caches = allocate_kv_caches(spec, num_blocks, device)
    table = [list(range(num_blocks))]
    image_embeds = torch.cat(model.encode_images(images)) if images else None
    tokens, out = list(prompt_ids), list[int]()
    new = tokens
    while len(out) < max_new_tokens:
        seq_len = len(tokens)
        attn = build_metadata([len(new)], [seq_len], table, block_size, device)
        ids = torch.tensor(new, dtype=torch.long, device=device)
        pos = torch.arange(seq_len - len(new), seq_len, device=device)
        hidden = model(ids, pos, attn, caches, None if out else image_embeds)
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(next_id)
        tokens = tokens + [next_id]
        new = [next_id]
    return out
