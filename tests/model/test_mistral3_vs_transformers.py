"""mistralpy's mistral3 equals transformers' Mistral3ForConditionalGeneration on random configs.

Each run draws fresh seeds (printed in failure messages): a random tiny config, random weights
(norms included), random prompts and images of odd sizes.
"""

from __future__ import annotations

import random

import pytest
import torch

from mistralpy.checkpoint.loader import load_model
from mistralpy.kernels.attention import KVCacheSpec, allocate_kv_caches, build_metadata
from mistralpy.model.mistral3 import greedy_generate
from mistralpy.testing.probes import prefill_logits
from tests.seeds import fresh_seeds

from .oracle import (
    IMAGE_TOKEN,
    hf_image_inputs,
    hf_logits,
    image_sizes,
    prompt_with_images,
    random_hf_model,
    random_images,
    save_hf,
)

TOL = 1e-4
SEEDS = fresh_seeds(2, __name__)


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def pair(request, tmp_path_factory):
    """(seed, transformers model, our model loaded from its save_pretrained checkpoint)."""
    seed = request.param
    hf = random_hf_model(seed)
    path = save_hf(hf, tmp_path_factory.mktemp("hf"))
    return seed, hf, load_model(path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("num_images", [0, 1, 2, 3])
def test_logits_match_transformers(pair, num_images):
    seed, hf, ours = pair
    sizes = image_sizes(hf.config, num_images, seed)
    ids = prompt_with_images(hf.config, sizes, seed + num_images)
    images = random_images(sizes, seed)
    expected = hf_logits(hf, ids, images)
    got = prefill_logits(ours, ids, images)
    diff = (expected - got).abs().max().item()
    assert diff <= TOL, f"seed={seed} sizes={sizes}: max |dlogit| {diff}"


def test_images_change_the_logits(pair):
    """Guards the comparison above: image features really reach the decoder."""
    seed, hf, ours = pair
    sizes = image_sizes(hf.config, 2, seed)
    ids = prompt_with_images(hf.config, sizes, seed)
    a = prefill_logits(ours, ids, random_images(sizes, seed))
    b = prefill_logits(ours, ids, random_images(sizes, seed + 1))
    assert (a - b).abs().max() > 1e-3


def test_encode_images_one_call_equals_one_by_one(pair):
    seed, hf, ours = pair
    images = random_images(image_sizes(hf.config, 3, seed), seed)
    with torch.no_grad():
        together = ours.encode_images(images)
        alone = [ours.encode_images([im])[0] for im in images]
    for t, a, im in zip(together, alone, images):
        rows, cols = im.shape[1] // 28, im.shape[2] // 28
        assert t.shape == (rows * cols, hf.config.text_config.hidden_size)
        torch.testing.assert_close(t, a, atol=1e-5, rtol=1e-5)


def _random_table(rng: random.Random, free: list[int], length: int, block_size: int) -> list[int]:
    """Takes ceil(length / block_size) random blocks out of `free`."""
    need = -(-length // block_size)
    picked = rng.sample(free, need)
    for b in picked:
        free.remove(b)
    return picked


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_then_decode_matches_full_forward(pair, block_size):
    """Prefill in random chunks (splitting images), then decode one token at a time through
    random block tables; every row's logits equal transformers' full forward."""
    seed, hf, ours = pair
    rng = random.Random(seed + block_size)
    sizes = image_sizes(hf.config, 2, seed)
    prompt = prompt_with_images(hf.config, sizes, seed)
    images = random_images(sizes, seed)
    ids = prompt + [rng.randrange(14, hf.config.text_config.vocab_size) for _ in range(5)]
    expected = hf_logits(hf, ids, images)

    free = list(range(64))
    table = _random_table(rng, free, len(ids), block_size)
    caches = allocate_kv_caches(
        KVCacheSpec.of_text(ours.config.text_config, block_size, torch.float32), 64, "cpu"
    )
    with torch.no_grad():
        embeds = torch.cat(ours.encode_images(images))
    done, rows = 0, []
    while done < len(ids):
        # prefill: random chunks that may split an image; then decode one token per step
        step = rng.randint(1, len(prompt) - done) if done < len(prompt) else 1
        chunk = ids[done : done + step]
        n_img_before = sum(t == 10 for t in ids[:done])
        n_img = sum(t == 10 for t in chunk)
        attn = build_metadata([step], [done + step], [table], block_size, "cpu")
        with torch.no_grad():
            hidden = ours(
                torch.tensor(chunk),
                torch.arange(done, done + step),
                attn,
                caches,
                embeds[n_img_before : n_img_before + n_img] if n_img else None,
            )
            rows.append(ours.compute_logits(hidden))
        done += step
    diff = (torch.cat(rows) - expected).abs().max().item()
    assert diff <= TOL, f"seed={seed} block_size={block_size}: max |dlogit| {diff}"


def test_packed_sequences_equal_each_alone(pair):
    """One forward holding a prefill chunk, a decode step and a fresh prefill of three
    sequences gives each sequence's rows of its own full forward."""
    seed, hf, ours = pair
    rng = random.Random(seed)
    block_size = 4
    vocab = hf.config.text_config.vocab_size
    seqs = [[rng.randrange(14, vocab) for _ in range(n)] for n in (11, 7, 5)]
    cached = [6, 6, 0]  # tokens of each sequence already in the cache before the packed step
    free = list(range(40))
    tables = [_random_table(rng, free, len(s), block_size) for s in seqs]
    caches = allocate_kv_caches(
        KVCacheSpec.of_text(ours.config.text_config, block_size, torch.float32), 40, "cpu"
    )
    with torch.no_grad():
        for s, n, t in zip(seqs, cached, tables):  # warm each cache alone
            if n:
                attn = build_metadata([n], [n], [t], block_size, "cpu")
                ours(torch.tensor(s[:n]), torch.arange(n), attn, caches, None)
        q_lens = [len(s) - n for s, n in zip(seqs, cached)]
        attn = build_metadata(q_lens, [len(s) for s in seqs], tables, block_size, "cpu")
        ids = torch.tensor([t for s, n in zip(seqs, cached) for t in s[n:]])
        pos = torch.cat([torch.arange(n, len(s)) for s, n in zip(seqs, cached)])
        packed = ours.compute_logits(ours(ids, pos, attn, caches, None)).split(q_lens)
    for s, n, rows in zip(seqs, cached, packed):
        alone = prefill_logits(ours, s, [])[n:]
        torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)
        assert (rows - hf_logits(hf, s, [])[n:]).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(pair, dtype, tmp_path):
    seed, hf, ours = pair
    path = save_hf(hf, tmp_path)
    half = load_model(path, dtype, torch.device("cpu"))
    assert half.lm_head.weight.dtype == dtype
    sizes = image_sizes(hf.config, 2, seed)
    ids = prompt_with_images(hf.config, sizes, seed)
    images = random_images(sizes, seed)
    ref = prefill_logits(ours, ids, images)
    got = prefill_logits(half, ids, images)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps 8 mantissa bits: allow a few percent of the logit range
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 0.05, f"seed={seed}"


def test_greedy_generate_matches_transformers_generate(pair):
    seed, hf, ours = pair
    assert_greedy_matches(hf, ours, seed)


# A draw whose model greedily emits the [IMG] id first. Recomputing transformers' logits over
# prompt + generated tokens then counted that text token as a 9th image placeholder for 8
# features ("Image features and image tokens do not match"): the oracle must be transformers'
# own cached `generate`, which (like the engine) embeds a generated [IMG] as plain text.
EMITS_IMAGE_TOKEN = 982526257


def test_greedy_generate_when_the_model_emits_the_image_token(tmp_path):
    hf = random_hf_model(EMITS_IMAGE_TOKEN)
    ours = load_model(save_hf(hf, tmp_path), torch.float32, torch.device("cpu"))
    assert IMAGE_TOKEN in assert_greedy_matches(hf, ours, EMITS_IMAGE_TOKEN)


def assert_greedy_matches(hf, ours, seed: int, new_tokens: int = 6) -> list[int]:
    """Our greedy_generate on a one-image prompt equals transformers' greedy `generate` (no
    EOS stop: both run `new_tokens` steps); returns the tokens."""
    sizes = image_sizes(hf.config, 1, seed)
    ids = prompt_with_images(hf.config, sizes, seed)
    images = random_images(sizes, seed)
    got = greedy_generate(ours, ids, new_tokens, images, block_size=4)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            **hf_image_inputs(images),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert got == out[0, len(ids) :].tolist(), f"seed={seed}"
    return got
