"""Small deterministic stand-ins with the model and tokenizer interfaces (tests only).

`FakeModel` really uses the paged KV cache (writes at slot_mapping, reads through block
tables), so a scheduling or block-table bug changes its outputs. `reference_greedy` runs the
same weights without any cache: the oracle for the engine's greedy outputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

VOCAB = 96
IMG = 10  # image token id, as in Mistral's Tekken vocabulary
EOS = 2
PATCH = 28  # pixels per merged image token side


class FakeModel(nn.Module):
    """A 2-layer causal transformer over a paged KV cache, float64, plus a toy image encoder."""

    def __init__(self, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 2):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.head_dim = hidden // heads
        self.heads = heads
        self.config = SimpleNamespace(
            text_config=SimpleNamespace(
                num_hidden_layers=layers,
                num_key_value_heads=heads,
                head_dim=self.head_dim,
                vocab_size=VOCAB,
                max_position_embeddings=4096,
            ),
            vision_config=SimpleNamespace(image_size=56, patch_size=14),
            spatial_merge_size=2,
            image_token_index=IMG,
        )

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(
                torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[0])
            )

        self.embed = param(VOCAB, hidden)
        self.img_proj = param(3, hidden)
        self.wqkv = nn.ParameterList([param(hidden, 3 * hidden) for _ in range(layers)])
        self.wo = nn.ParameterList([param(hidden, hidden) for _ in range(layers)])
        self.lm_head = param(hidden, VOCAB)
        self.encoded: list[int] = []  # number of images per encode_images call (for tests)

    def encode_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3, H, W) -> (H/28 * W/28, hidden): mean colour of each 28x28 patch, projected."""
        self.encoded.append(len(pixel_values))
        out = []
        for px in pixel_values:
            pooled = torch.nn.functional.avg_pool2d(px[None].double(), PATCH)[0]  # (3, r, c)
            out.append(pooled.flatten(1).T @ self.img_proj)
        return out

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids]

    def embed_positions(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(self.embed.shape[1], dtype=torch.float64) + 1
        return torch.sin(positions[:, None].double() / freqs) * 0.5

    def forward(self, input_ids, positions, attn, kv_caches, image_embeds=None):
        h = self.embed_tokens(input_ids) + self.embed_positions(positions)
        if image_embeds is not None:
            mask = input_ids == IMG
            assert int(mask.sum()) == image_embeds.shape[0]
            h[mask] = image_embeds.double()
        for layer, cache in enumerate(kv_caches):
            q, k, v = (h @ self.wqkv[layer]).split(h.shape[1], dim=1)
            shape = (-1, self.heads, self.head_dim)
            cache[0].view(shape)[attn.slot_mapping] = k.reshape(shape).to(cache.dtype)
            cache[1].view(shape)[attn.slot_mapping] = v.reshape(shape).to(cache.dtype)
            out = torch.empty_like(h)
            bs = cache.shape[2]
            start = 0
            for b, (qlen, slen) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu)):
                blocks = attn.block_tables[b, : -(-slen // bs)].long()
                keys = cache[0, blocks].reshape(-1, h.shape[1])[:slen].double()
                vals = cache[1, blocks].reshape(-1, h.shape[1])[:slen].double()
                out[start : start + qlen] = _causal(q[start : start + qlen], keys, vals)
                start += qlen
            h = h + torch.tanh(out @ self.wo[layer])
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head).float() * 4.0

    @torch.no_grad()
    def reference_greedy(self, prompt: list[int], images: list, max_tokens: int) -> list[int]:
        """Greedy continuation recomputing the whole sequence each token, without a KV cache
        (a private contiguous cache of exactly the sequence length)."""
        from mistralpy.kernels.attention import AttentionMetadata

        ids = list(prompt)
        embeds = self.encode_images([im.pixel_values for im in images]) if images else None
        embeds = torch.cat(embeds) if embeds else None
        out = []
        for _ in range(max_tokens):
            n = len(ids)
            caches = [
                torch.zeros(2, n, 1, self.heads, self.head_dim, dtype=torch.float64)
                for _ in self.wqkv
            ]
            attn = AttentionMetadata(
                query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                seq_lens=torch.tensor([n], dtype=torch.int32),
                block_tables=torch.arange(n, dtype=torch.int32)[None],
                slot_mapping=torch.arange(n),
                max_query_len=n,
                max_seq_len=n,
                query_lens_cpu=[n],
                seq_lens_cpu=[n],
            )
            t = torch.tensor(ids)
            generated_images = ids[len(prompt) :].count(IMG)  # ordinary tokens, not images
            rows = [embeds] if embeds is not None else []
            rows += [self.embed[IMG][None]] * generated_images
            h = self.forward(t, torch.arange(n), attn, caches, torch.cat(rows) if rows else None)
            token = int(self.compute_logits(h[-1:]).argmax(-1))
            out.append(token)
            ids.append(token)
            if token == EOS:
                break
        return out


def _causal(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """q (Lq, H), keys/vals (Lk, H): the new queries are the last Lq of the Lk positions."""
    scores = q @ keys.T / math.sqrt(q.shape[1])
    offset = keys.shape[0] - q.shape[0]
    allowed = torch.arange(keys.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vals


class FakeTokenizer:
    """Token i reads "w{i} "; ids 0..3 are special (0 <unk>, 1 <s>, 2 </s>, 10 [IMG])."""

    eos_token_id = EOS
    bos_token_id = 1
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", IMG: "[IMG]"}

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        if token_id in self.specials:
            return b"" if skip_special_tokens else self.specials[token_id].encode()
        return f"w{token_id} ".encode()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return b"".join(self.token_bytes(i, skip_special_tokens) for i in ids).decode()

    def id_to_token(self, token_id: int) -> str:
        return self.token_bytes(token_id, False).decode()


def fake_image(seed: int, rows: int, cols: int) -> SimpleNamespace:
    """A ProcessedImage-like object with random pixels of rows x cols merged tokens."""
    gen = torch.Generator().manual_seed(seed)
    px = torch.randn(3, rows * PATCH, cols * PATCH, generator=gen)
    return SimpleNamespace(
        pixel_values=px, content_hash=f"img{seed}-{rows}x{cols}", rows=rows, cols=cols
    )


def image_prompt(
    text_before: list[int], image: SimpleNamespace, text_after: list[int]
) -> list[int]:
    """Pixtral layout: rows of [IMG]*cols each ended by [IMG_BREAK] (12), last by [IMG_END] (13)."""
    ids = list(text_before)
    for r in range(image.rows):
        ids += [IMG] * image.cols + [12 if r < image.rows - 1 else 13]
    return ids + list(text_after)
