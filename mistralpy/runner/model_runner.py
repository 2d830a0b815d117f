"""Runs the model for one scheduled step: encode images, forward, logits, sample.

The runner owns the device state: model weights, per-layer KV caches, the encoder-output cache
(image embeddings by content hash, LRU) and one torch.Generator per sequence. Everything it
receives and returns is plain data (`ScheduledBatch` in, `ModelOutput` out).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mistralpy.runner.batch import ForwardBatch, ImageSlice, ScheduledBatch, build_forward_batch
from mistralpy.runner.kv_cache import (
    KVCacheSpec,
    allocate_kv_caches,
    cuda_kv_budget,
    num_blocks_for_bytes,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunnerConfig:
    block_size: int
    max_num_batched_tokens: int  # the largest step, used for the memory profile
    max_num_seqs: int
    gpu_memory_utilization: float  # CUDA: share of total memory for weights + activations + KV
    cpu_kv_cache_bytes: int  # CPU: KV cache size in bytes
    num_kv_blocks: int | None = None  # fixed block count instead of a memory-derived one
    encoder_cache_size: int = 16384  # image-embedding rows kept across steps


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # log-prob of token_id (None unless requested)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first


@dataclass
class ModelOutput:
    sampled: dict[str, SampledToken]  # seq_id -> token, for every sequence that sampled


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow on most hosts)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class EncoderCache:
    """LRU of image embeddings (rows, hidden) by image content hash, bounded in rows."""

    def __init__(self, capacity_rows: int):
        self.capacity_rows = capacity_rows
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.rows = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.entries or value.shape[0] > self.capacity_rows:
            return
        self.entries[key] = value
        self.rows += value.shape[0]
        while self.rows > self.capacity_rows:
            _, old = self.entries.popitem(last=False)
            self.rows -= old.shape[0]


class ModelRunner:
    """Model + KV cache + sampler for one device."""

    def __init__(
        self, model: Any, cfg: RunnerConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        text = model.config.text_config
        # A tensor-parallel shard caches only its own KV heads (stand-in models lack the field).
        kv_heads = getattr(model, "num_local_kv_heads", text.num_key_value_heads)
        self.kv_spec = KVCacheSpec(
            text.num_hidden_layers, kv_heads, text.head_dim, cfg.block_size, dtype
        )
        self.num_blocks = cfg.num_kv_blocks or self._count_blocks()
        self.kv_caches = allocate_kv_caches(self.kv_spec, self.num_blocks, device)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_size)
        self.generators: dict[str, torch.Generator] = {}
        self._masker: Any = None  # processing.grammar.GrammarMasker, made on first use

    @classmethod
    def load(
        cls,
        path: Path,
        cfg: RunnerConfig,
        device: torch.device,
        dtype: torch.dtype,
        isq: str | None = None,
        load_format: str = "auto",
    ) -> ModelRunner:
        """Load the checkpoint at `path` onto `device`, then size and allocate the KV cache."""
        from mistralpy.checkpoint.loader import load_model

        model = load_model(path, dtype, device, isq=isq, load_format=load_format)
        return cls(model.eval(), cfg, device, dtype)

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        """One step: forward over all scheduled tokens, sample where a sequence reached its end."""
        fb = build_forward_batch(batch, self.cfg.block_size, self.device)
        masks = self._submit_grammar_masks(fb)  # computed on a worker during the forward
        image_embeds = self._image_embeds(fb.image_slices)
        hidden = self.model(fb.input_ids, fb.positions, fb.attn, self.kv_caches, image_embeds)
        if not fb.sample_seqs:
            return ModelOutput({})
        logits = self.model.compute_logits(hidden[fb.logits_rows])
        allowed = None
        if masks is not None:
            from mistralpy.processing.grammar import bitmask_to_allowed

            allowed = bitmask_to_allowed(masks.result(), logits.shape[-1], self.device)
        return self._sample(logits, fb, allowed)

    def shutdown(self) -> None:
        """Release what outlives this object (nothing on one device; TP workers stop)."""

    def release(self, seq_ids: list[str]) -> None:
        """Forget per-sequence state (generators) of finished sequences."""
        for sid in seq_ids:
            self.generators.pop(sid, None)

    def _image_embeds(self, slices: list[ImageSlice]) -> torch.Tensor | None:
        """(N, hidden) embeddings for this step's image tokens, encoding each missing image
        once (all missing images of the step in one encoder call)."""
        if not slices:
            return None
        found: dict[str | None, torch.Tensor] = {}
        missing: dict[str, torch.Tensor] = {}
        for s in slices:
            if s.key is None:  # image-token ids the model generated: their own embedding
                found[None] = self._image_token_embedding()
                continue
            cached = self.encoder_cache.get(s.key)
            if cached is not None:
                found[s.key] = cached
            elif s.key not in missing:
                missing[s.key] = s.pixel_values.to(self.device, self.kv_spec.dtype)
        if missing:
            for key, embeds in zip(missing, self.model.encode_images(list(missing.values()))):
                found[key] = embeds
                self.encoder_cache.put(key, embeds)
        rows = [
            found[s.key][s.start : s.end] if s.key is not None else found[None].expand(s.end, -1)
            for s in slices
        ]
        return torch.cat(rows)

    def _image_token_embedding(self) -> torch.Tensor:
        """(1, hidden) input embedding of the image token id itself."""
        token = torch.tensor([self.model.config.image_token_index], device=self.device)
        return self.model.language_model.embed_tokens(token)

    def _submit_grammar_masks(self, fb: ForwardBatch) -> Future | None:
        """Start computing the grammar bitmask of the sampling rows; None if no row has one."""
        matchers = [s.sample.grammar for s in fb.sample_seqs]
        if all(m is None for m in matchers):
            return None
        if self._masker is None:
            from mistralpy.processing.grammar import GrammarMasker

            self._masker = GrammarMasker(self.vocab_size, pin_memory=self.device.type == "cuda")
        return self._masker.submit(matchers)

    def _sample(
        self, logits: torch.Tensor, fb: ForwardBatch, allowed: torch.Tensor | None
    ) -> ModelOutput:
        """Sample one token per row of `logits` (S, V) float32 and copy the results to host.
        allowed: (S, V) bool grammar mask, or None."""
        from mistralpy.kernels.sampling import SamplingTensors, sample

        specs = [s.sample for s in fb.sample_seqs]
        st = SamplingTensors.from_params(
            [sp.params for sp in specs],
            [sp.prompt_ids for sp in specs],
            [sp.output_ids for sp in specs],
            logits.shape[-1],
            self.device,
        )
        gens = [self._generator(s.seq_id, s.sample.seed) for s in fb.sample_seqs]
        out = sample(logits, st, gens, allowed)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
        top_vals = out.top_logprob_values.tolist() if out.top_logprob_values is not None else None
        sampled = {}
        for row, seq in enumerate(fb.sample_seqs):
            params = seq.sample.params
            want = params.logprobs or params.top_logprobs > 0
            top = []
            if top_ids is not None and params.top_logprobs > 0:
                k = params.top_logprobs
                top = list(zip(top_ids[row][:k], top_vals[row][:k]))
            lp = logprobs[row] if (want and logprobs is not None) else None
            sampled[seq.seq_id] = SampledToken(token_ids[row], lp, top)
        return ModelOutput(sampled)

    def _generator(self, seq_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[seq_id] = gen
        return gen

    def _count_blocks(self) -> int:
        """KV blocks that fit: the CPU byte budget, or on CUDA what is left of
        `gpu_memory_utilization` after the weights and a profiled largest step."""
        if self.device.type != "cuda":
            return num_blocks_for_bytes(self.kv_spec, self.cfg.cpu_kv_cache_bytes)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        budget = cuda_kv_budget(self.device, self.cfg.gpu_memory_utilization, peak)
        return num_blocks_for_bytes(self.kv_spec, budget)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """Largest step we will run, on a throwaway cache: max_num_batched_tokens new tokens,
        logits for max_num_seqs rows, and one largest image through the encoder."""
        from mistralpy.kernels.attention import AttentionMetadata

        cfg = self.cfg
        tokens = cfg.max_num_batched_tokens
        bs = cfg.block_size
        num_blocks = -(-tokens // bs)
        caches = allocate_kv_caches(self.kv_spec, num_blocks, self.device)
        vision = self.model.config.vision_config
        side = vision.image_size - vision.image_size % (
            vision.patch_size * self.model.config.spatial_merge_size
        )
        self.model.encode_images(
            [torch.zeros(3, side, side, device=self.device, dtype=self.kv_spec.dtype)]
        )

        def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        attn = AttentionMetadata(
            query_start_loc=dev([0, tokens], torch.int32),
            seq_lens=dev([tokens], torch.int32),
            block_tables=dev([list(range(num_blocks))], torch.int32),
            slot_mapping=torch.arange(tokens, device=self.device),
            max_query_len=tokens,
            max_seq_len=tokens,
            query_lens_cpu=[tokens],
            seq_lens_cpu=[tokens],
        )
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(tokens, device=self.device), attn, caches, None)
        self.model.compute_logits(hidden[: cfg.max_num_seqs])
        del caches, hidden
