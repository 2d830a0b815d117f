"""Helpers for comparing mistralpy's mistral3 with transformers on fresh random tiny configs."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers

IMAGE_TOKEN = 10
BREAK_TOKEN = 12  # any non-image token: the model itself only replaces [IMG] positions


def random_hf_config(seed: int) -> transformers.Mistral3Config:
    """A tiny random mistral3 config: GQA, heads * head_dim != hidden, theta 1e9 / 1e4."""
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([2, 3])
    head_dim = rng.choice([8, 16])
    hidden = heads * head_dim + rng.choice([8, 16])  # deliberately != heads * head_dim
    v_heads = rng.choice([2, 3])
    v_hidden = v_heads * rng.choice([8, 12])
    text = dict(
        model_type="mistral",
        vocab_size=rng.choice([160, 256]),
        hidden_size=hidden,
        intermediate_size=rng.choice([48, 80]),
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
        rope_theta=1e9,
        max_position_embeddings=131072,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=v_hidden,
        intermediate_size=rng.choice([40, 64]),
        num_hidden_layers=2,
        num_attention_heads=v_heads,
        image_size=28 * rng.choice([4, 5, 6]),
        patch_size=14,
        rope_theta=1e4,
        hidden_act="silu",
        head_dim=v_hidden // v_heads,
    )
    return transformers.Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=rng.choice([False, True]),
        tie_word_embeddings=False,
    )


def random_hf_model(seed: int) -> transformers.Mistral3ForConditionalGeneration:
    """A float32 eval-mode transformers model whose every parameter is random.

    Norm weights are drawn around 1 too (not left at 1) so a misplaced norm would show.
    """
    config = random_hf_config(seed)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.08)
    return model


def save_hf(model: transformers.PreTrainedModel, path: Path, max_shard_size: str = "50GB") -> Path:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def image_sizes(
    config: transformers.Mistral3Config, count: int, seed: int
) -> list[tuple[int, int]]:
    """Scaled-down analogues of 333x517, 1x1000 and 1540x1540 (multiples of 28, <= image_size)."""
    rng = random.Random(seed)
    top = config.vision_config.image_size
    shapes = [
        (56, 84 + 28 * rng.choice([0, 1])),  # landscape, odd aspect
        (28, top),  # a one-row strip
        (top, top),  # the largest square
    ]
    return shapes[:count]


def prompt_with_images(
    config: transformers.Mistral3Config, sizes: list[tuple[int, int]], seed: int
) -> list[int]:
    """Random text tokens with one run of rows*cols [IMG] tokens (+ a break token) per image."""
    rng = random.Random(seed)
    vocab = config.text_config.vocab_size

    def text(n: int) -> list[int]:
        return [rng.choice([t for t in range(14, vocab)]) for _ in range(n)]

    ids = [1] + text(rng.randint(2, 6))
    for h, w in sizes:
        ids += [IMAGE_TOKEN] * ((h // 28) * (w // 28)) + [BREAK_TOKEN] + text(rng.randint(1, 4))
    return ids


def random_images(sizes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


@torch.no_grad()
def hf_logits(
    model: transformers.Mistral3ForConditionalGeneration,
    ids: list[int],
    images: list[torch.Tensor],
) -> torch.Tensor:
    """(T, vocab) logits from transformers; images padded into one batch with image_sizes."""
    out = model(input_ids=torch.tensor([ids]), use_cache=False, **hf_image_inputs(images))
    return out.logits[0].float()


def hf_image_inputs(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' image arguments: images (3, H, W) zero-padded into one (N, 3, Hmax, Wmax)
    batch, and their true sizes (N, 2); empty without images."""
    if not images:
        return {}
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, height, width)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])
    return {"pixel_values": batch, "image_sizes": sizes}
