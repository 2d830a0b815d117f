"""Runs the model for one scheduled step: encode images, forward, logits, sample.

The runner owns the device state: model weights, per-layer KV caches, the encoder-output cache
(image embeddings by content hash, LRU) and one torch.Generator per sequence. Everything it
receives and returns is plain data (`ScheduledBatch` in, `ModelOutput` out).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mistralpy.kernels.attention import KVCacheSpec, allocate_kv_caches
from mistralpy.runner.batch import (
    ImageSlice,
    ScheduledBatch,
    SeqWork,
    build_forward_batch,
    decode_rows,
)
from mistralpy.runner.kv_cache import (
    allocate_kv_scales,
    cuda_kv_budget,
    num_blocks_for_bytes,
    resolve_kv_cache_dtype,
)

if TYPE_CHECKING:
    from mistralpy.kernels.sampling import SamplerOutput
    from mistralpy.params import SamplingParams
    from mistralpy.processing.grammar import GrammarMasker, GrammarMatcher
    from mistralpy.runner.cpu_decode import FusedCpuDecode
    from mistralpy.runner.cuda_graphs import DecodeGraphs
    from mistralpy.runner.model_protocol import RunnerModel

logger = logging.getLogger(__name__)

DECODE_TUNING_CONTEXT = 1024  # tokens per sequence at which decode launch plans are timed


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's share of `EngineConfig`, made by `engine.runner_config` (the defaults
    live there, once)."""

    block_size: int
    max_num_batched_tokens: int  # the largest step, used for the memory profile
    max_num_seqs: int
    # rows of the largest decode CUDA graph: max_num_seqs, times 1 + k when the engine
    # speculates (a sequence verifying k drafts is k + 1 rows)
    max_decode_rows: int
    gpu_memory_utilization: float  # CUDA: share of total memory for weights + activations + KV
    cpu_kv_cache_bytes: int  # CPU: KV cache size in bytes
    num_kv_blocks: int | None  # fixed block count instead of a memory-derived one
    encoder_cache_size: int  # image-embedding rows kept across steps
    enforce_eager: bool  # no decode CUDA graphs / fused CPU decode (debugging, A/B)
    kv_cache_dtype: str  # "auto" (model dtype) | "fp8" | "fp8_e4m3" (e4m3 + scales)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # log-prob of token_id (None unless requested)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first


@dataclass
class ModelOutput:
    sampled: dict[str, SampledToken]  # seq_id -> token, for every sequence that sampled
    # seq_id -> the drafts accepted (speculative decoding), emitted before `sampled[seq_id]`
    accepted: dict[str, list[SampledToken]] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow on most hosts)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)  # one of model.config.MODEL_DTYPES (EngineConfig checks)


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
        self, model: RunnerModel, cfg: RunnerConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.dtype = dtype  # the model's (weights, activations); the KV cache's is kv_spec.dtype
        text = model.config.text_config
        # A tensor-parallel shard caches only its own KV heads (stand-in models lack the field).
        kv_heads = getattr(model, "num_local_kv_heads", text.num_key_value_heads)
        self.kv_spec = KVCacheSpec(
            text.num_hidden_layers, kv_heads, text.head_dim, cfg.block_size,
            resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype),
        )  # fmt: skip
        # fp8 cache: per-layer (k_scale, v_scale), stable device tensors the kernels (and the
        # captured graphs) read; set before the memory profile, which runs an fp8 step
        self.kv_scales = allocate_kv_scales(self.kv_spec, device)
        if self.kv_scales is not None:
            model.set_kv_scales(self.kv_scales)
        self.cuda_attention: Any = None  # kernels.cuda_attention.CudaPagedAttention on CUDA
        self.gemv_report: dict[str, Any] = {}  # per weight shape: GEMV chosen at start-up
        if device.type == "cpu":
            from mistralpy.runner.cpu_linear import use_onednn_linears

            use_onednn_linears(model)
            use_cpu_kernels(model)
        if device.type == "cuda":
            # before the memory profile: it runs these kernels
            self.cuda_attention = use_cuda_kernels(model)
            if not cfg.enforce_eager:
                from mistralpy.runner.cuda_graphs import batch_buckets
                from mistralpy.runner.gemv import use_tuned_gemv

                self.gemv_report = use_tuned_gemv(model, batch_buckets(cfg.max_decode_rows))
        self.num_blocks = cfg.num_kv_blocks or self._count_blocks()
        self.kv_caches = allocate_kv_caches(self.kv_spec, self.num_blocks, device)
        self.cpu_decode: FusedCpuDecode | None = None  # CPU: whole decode steps in one call
        if device.type == "cpu" and not cfg.enforce_eager and self.kv_spec.fp8:
            # its numba attention reads float32 K/V rows through raw addresses
            logger.info("fused CPU decode off: the KV cache is fp8; decode takes the layer path")
        elif device.type == "cpu" and not cfg.enforce_eager:
            from mistralpy.runner.cpu_decode import FusedCpuDecode

            self.cpu_decode = FusedCpuDecode.build(model, self.kv_caches)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_size)
        self.generators: dict[str, torch.Generator] = {}
        self._masker: GrammarMasker | None = None  # made on first use
        self.decode_graphs: DecodeGraphs | None = None
        self.graph_verify_steps = 0  # verify steps run through the decode graphs (benchmarks)
        self._ahead: _LaunchAhead | None = None  # a decode step launched ahead (CUDA graphs)
        if device.type == "cuda" and not cfg.enforce_eager:
            self.decode_graphs = self._capture_decode_graphs()
            self._sampled_host = torch.empty(cfg.max_num_seqs, dtype=torch.int64, pin_memory=True)
            self._sampled_event = torch.cuda.Event()

    @classmethod
    def load(
        cls,
        path: Path,
        cfg: RunnerConfig,
        device: torch.device,
        dtype: torch.dtype,
        isq: str | None = None,
        load_format: str = "auto",
        dequantize: bool = False,
        mmproj: str | None = None,
    ) -> ModelRunner:
        """Load the checkpoint at `path` onto `device`, then size and allocate the KV cache.
        dequantize: a GGUF model's block-quantized tensors become dense `dtype` weights;
        mmproj: a GGUF model's vision file (llama.cpp's --mmproj)."""
        from mistralpy.checkpoint.loader import load_model

        model = load_model(
            path, dtype, device, isq=isq, load_format=load_format, dequantize=dequantize,
            mmproj=mmproj,
        )  # fmt: skip
        return cls(model.eval(), cfg, device, dtype)

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        """One step: forward over all scheduled tokens, sample where a sequence reached its end."""
        if self.decode_graphs is not None and self._graphable(batch):
            return self._execute_decode(batch.seqs)
        if self.cpu_decode is not None and self.cpu_decode.accepts(batch.seqs):
            return self._execute_cpu_decode(batch.seqs)
        self._ahead = None  # a step launched ahead is not this one: its result is dropped
        fb = build_forward_batch(batch, self.cfg.block_size, self.device)
        plain = [s for s in fb.sample_seqs if not s.spec.draft_ids]
        masks = self._submit_grammar_masks(plain)  # computed during the forward
        image_embeds = self._image_embeds(fb.image_slices)
        hidden = self.model(fb.input_ids, fb.positions, fb.attn, self.kv_caches, image_embeds)
        if not fb.sample_seqs:
            return ModelOutput({})
        logits = self.model.compute_logits(hidden[fb.logits_rows])
        if len(plain) < len(fb.sample_seqs):
            return self._verify_step(logits, fb.sample_seqs, plain, masks)
        out = self._sample(logits, fb.sample_seqs, self._allowed(masks, logits))
        return self._model_output(out, fb.sample_seqs, out.token_ids.tolist())

    def _verify_step(
        self,
        logits: torch.Tensor,
        seqs: list[SeqWork],
        plain: list[SeqWork],
        masks: tuple[list[int], Future] | None,
    ) -> ModelOutput:
        """Sample a step that verifies drafts. logits (R, V): one row per sampling sequence,
        K + 1 rows for one verifying K drafts, in `seqs` order (from the eager forward's
        logits rows or from the decode graphs' rows: the same layout). Plain rows sample as
        usual (grammar `masks` are theirs); each drafting sequence accepts a prefix of its
        drafts."""
        rows = _sample_rows(seqs)
        result = ModelOutput({})
        if plain:
            first = [rows[s.seq_id].start for s in plain]
            plain_logits = logits[torch.tensor(first, device=self.device)]
            out = self._sample(plain_logits, plain, self._allowed(masks, plain_logits))
            result = self._model_output(out, plain, out.token_ids.tolist())
        for s in seqs:
            if s.spec.draft_ids:
                tokens = self._verify(s, logits[rows[s.seq_id]])
                result.sampled[s.seq_id] = tokens[-1]
                result.accepted[s.seq_id] = tokens[:-1]
        return result

    def _verify(self, seq: SeqWork, logits: torch.Tensor) -> list[SampledToken]:
        """The tokens a sequence emits from its verify rows `logits` (K + 1, V): the accepted
        drafts, then the target's correction or bonus token. A draft the grammar forbids
        ends the drafts there (it would be rejected anyway)."""
        from mistralpy.kernels.sampling import SamplingTensors, verify_drafts

        spec = seq.spec
        if spec.grammar is None and _plain_greedy(spec.params):
            return _greedy_verify(spec.draft_ids, logits)
        drafts, allowed = spec.draft_ids, None
        if spec.grammar is not None:
            drafts, masks = _grammar_draft_masks(spec.grammar, drafts, logits.shape[-1])
            allowed = masks.to(self.device)
        k = len(drafts)
        st = SamplingTensors.from_params(
            [spec.params] * (k + 1),
            [spec.prompt_ids] * (k + 1),
            [spec.output_ids + drafts[:i] for i in range(k + 1)],  # penalties see the drafts
            logits.shape[-1],
            self.device,
        )
        draft_ids = torch.tensor(drafts, dtype=torch.int64, device=self.device)
        gen = self._generator(seq.seq_id, spec.seed)
        out, n = verify_drafts(logits[: k + 1], st, gen, draft_ids, allowed)
        host = _host_logprobs(out)
        ids = out.token_ids[: n + 1].tolist()
        return [_sampled_token(host, row, spec.params, t) for row, t in enumerate(ids)]

    def _execute_cpu_decode(self, seqs: list[SeqWork]) -> ModelOutput:
        """A CPU decode step through the fused step (`runner.cpu_decode`)."""
        assert self.cpu_decode is not None
        masks = self._submit_grammar_masks(seqs)  # computed during the forward
        logits = self.cpu_decode(seqs, self.cfg.block_size)
        out = self._sample(logits, seqs, self._allowed(masks, logits))
        return self._model_output(out, seqs, out.token_ids.tolist())

    def _graphable(self, batch: ScheduledBatch) -> bool:
        """A decode or verify step that a captured bucket holds: every sequence samples at
        each of its tokens (one token, or the last token + its K drafts), has no image rows,
        and its block table fits the graphs' width and covers its positions. Its rows (one
        per token, `decode_rows`) fit a bucket."""
        graphs = self.decode_graphs
        assert graphs is not None
        bs = self.cfg.block_size
        rows = sum(len(s.token_ids) for s in batch.seqs)
        return graphs.bucket(rows) is not None and all(
            s.sample is not None
            and len(s.token_ids) == 1 + len(s.sample.draft_ids)
            and not s.images
            and s.start_pos + len(s.token_ids) <= len(s.block_table) * bs <= graphs.width * bs
            for s in batch.seqs
        )

    def _execute_decode(self, seqs: list[SeqWork]) -> ModelOutput:
        """Decode (and verify drafts) through the captured graphs. When every sequence will
        likely go on, the next step is launched before this one's tokens reach the host (its
        input ids are the sampled tokens, on the device), so the GPU runs it while the engine
        does its host work; the next `execute` uses it if its batch is the one predicted (else
        it is dropped: it only wrote K/V into slots the real step rewrites or that belong to
        finished sequences). A step with drafts is never launched ahead (`_predictable`)."""
        graphs = self.decode_graphs
        assert graphs is not None
        plain = [s for s in seqs if not s.spec.draft_ids]
        masks = self._submit_grammar_masks(plain)
        logits, bucket = self._decode_logits(graphs, seqs)
        if len(plain) < len(seqs):
            self.graph_verify_steps += 1
            return self._verify_step(logits, seqs, plain, masks)
        out = self._sample(logits, seqs, self._allowed(masks, logits))
        n = len(seqs)
        host = self._sampled_host[:n]
        host.copy_(out.token_ids, non_blocking=True)
        self._sampled_event.record()
        if bucket is not None and out.logprobs is None and self._predictable(seqs):
            graphs.advance(n, out.token_ids)
            graphs.replay(bucket)
            self._ahead = _LaunchAhead(seqs, bucket)
        self._sampled_event.synchronize()  # this step's tokens only, not the one launched ahead
        token_ids = host.tolist()
        if self._ahead is not None:
            self._ahead.tokens = token_ids
        return self._model_output(out, seqs, token_ids)

    def _decode_logits(
        self, graphs: DecodeGraphs, seqs: list[SeqWork]
    ) -> tuple[torch.Tensor, int | None]:
        """Logits (rows, V) of this step, one row per token (`decode_rows`): from the step
        launched ahead if it predicted this batch (or a subset of it, in order), else from a
        fresh replay. The bucket is returned when the graph inputs now hold exactly these rows
        (the next step may be launched ahead from them), else None."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            rows = ahead.match(seqs)
            if rows is not None:
                logits = graphs.outputs[ahead.bucket][: len(ahead.seqs)]
                if len(rows) == len(ahead.seqs):
                    return logits, ahead.bucket
                return logits[torch.tensor(rows, device=self.device)], None
        step = decode_rows(seqs)
        bucket = graphs.load(step.token_ids, step.positions, step.tables)
        return graphs.replay(bucket)[: len(step.token_ids)], bucket

    def _predictable(self, seqs: list[SeqWork]) -> bool:
        """Whether the next step is worth launching ahead: every next position is inside the
        sequence's allocated blocks, and some sequence does not end on max_tokens now."""
        bs = self.cfg.block_size
        if any(s.start_pos + 1 >= len(s.block_table) * bs for s in seqs):
            return False
        if any(s.spec.speculative for s in seqs):
            return False  # its next step likely verifies drafts: a different batch
        return any(not _ends_on_length(s) for s in seqs)

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """Capture decode graphs for every batch bucket (None, logged, if capture fails: e.g.
        a quantized linear whose kernel cannot be captured)."""
        from mistralpy.runner.cuda_graphs import DecodeGraphs

        text = self.model.config.text_config
        self.cuda_attention.warm_up(self.kv_caches[0], text.num_attention_heads, self.dtype)
        width = min(self.num_blocks, -(-text.max_position_embeddings // self.cfg.block_size))
        graphs = DecodeGraphs(
            self._decode_forward, self.cfg.max_decode_rows, width, self.cfg.block_size, self.device
        )
        context = min(DECODE_TUNING_CONTEXT, width * self.cfg.block_size - 1)
        for rows in graphs.buckets:
            plan = self.cuda_attention.tune_decode(
                self.kv_caches, rows, width, text.num_attention_heads, context, self.dtype
            )
            logger.debug("decode plan for %d rows: %s", rows, plan)
        try:
            graphs.capture()
        except Exception:  # noqa: BLE001 - eager decode still works
            logger.warning("decode CUDA graphs disabled: capture failed", exc_info=True)
            return None
        return graphs

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, attn: Any) -> torch.Tensor:
        """The captured computation: ids/pos (B,) -> logits (B, V) float32."""
        return self.model.compute_logits(self.model(ids, pos, attn, self.kv_caches, None))

    def _allowed(
        self, masks: tuple[list[int], Future] | None, logits: torch.Tensor
    ) -> GrammarRows | None:
        """The grammar rows' allowed-token masks, once computed (None: no row has a grammar)."""
        if masks is None:
            return None
        from mistralpy.processing.grammar import bitmask_to_allowed

        rows, future = masks
        bitmask = future.result()
        allowed = bitmask_to_allowed(bitmask, logits.shape[-1], self.device)
        return GrammarRows(torch.tensor(rows, device=self.device), allowed)

    def discard_lookahead(self) -> None:
        """Forget the decode step launched ahead (call after writing the graph inputs
        directly, e.g. in a benchmark)."""
        self._ahead = None

    def shutdown(self) -> None:
        """Release what outlives this object (nothing on one device; TP workers stop)."""

    def check_alive(self) -> None:
        """Raise RunnerDeadError if this runner can never step again (a dead tensor-parallel
        worker); cheap, for an idle engine to notice. One device: always alive."""

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
                assert s.pixel_values is not None, "an image slice with a key carries its pixels"
                missing[s.key] = s.pixel_values.to(self.device, self.dtype)
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
        return self.model.embed_tokens(token)

    def _submit_grammar_masks(self, sample_seqs: list[SeqWork]) -> tuple[list[int], Future] | None:
        """Start computing the grammar bitmasks of the sampling rows that have a grammar:
        (those rows, a future of their (G, ceil(V/32)) bitmask). None if no row has one."""
        rows = [i for i, s in enumerate(sample_seqs) if s.spec.grammar is not None]
        if not rows:
            return None
        if self._masker is None:
            from mistralpy.processing.grammar import GrammarMasker

            self._masker = GrammarMasker(self.vocab_size, pin_memory=self.device.type == "cuda")
        return rows, self._masker.submit([sample_seqs[i].spec.grammar for i in rows])

    def _sample(
        self, logits: torch.Tensor, seqs: list[SeqWork], grammar: GrammarRows | None
    ) -> SamplerOutput:
        """One token per row of `logits` (S, V) float32 for the sampling sequences `seqs`, on
        the device (no host sync). grammar: the allowed-token masks of the rows that have a
        grammar, or None."""
        from mistralpy.kernels.sampling import SamplerOutput, SamplingTensors, sample

        specs = [s.spec for s in seqs]
        if grammar is None and all(_plain_greedy(sp.params) for sp in specs):
            # the common benchmark/tool case: skip building per-row parameter tensors
            return SamplerOutput(_argmax(logits), None, None, None)
        st = SamplingTensors.from_params(
            [sp.params for sp in specs],
            [sp.prompt_ids for sp in specs],
            [sp.output_ids for sp in specs],
            logits.shape[-1],
            self.device,
        )
        gens = [self._generator(s.seq_id, s.spec.seed) for s in seqs]
        if grammar is None:
            return sample(logits, st, gens)
        return sample(logits, st, gens, grammar.allowed, grammar.rows)

    def _model_output(
        self, out: SamplerOutput, seqs: list[SeqWork], token_ids: list[int]
    ) -> ModelOutput:
        """Host-side results: `token_ids` (already copied) plus the requested log-probs."""
        host = _host_logprobs(out)
        return ModelOutput(
            {
                seq.seq_id: _sampled_token(host, row, seq.spec.params, token_ids[row])
                for row, seq in enumerate(seqs)
            }
        )

    def _generator(self, seq_id: str, seed: int | None) -> torch.Generator | None:
        """The sequence's own generator (None without a seed: the device's default one). A
        CPU generator even for CUDA logits: the sampler draws one number per row from it, so
        it costs no device kernel (per-step CUDA generators cost ~8 ms at batch 256)."""
        if seed is None:
            return None
        gen = self.generators.get(seq_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            self.generators[seq_id] = gen
        return gen

    def _count_blocks(self) -> int:
        """KV blocks that fit: the CPU byte budget, or on CUDA what is left of
        `gpu_memory_utilization` after the weights and a profiled largest step."""
        if self.device.type != "cuda":
            return num_blocks_for_bytes(self.kv_spec, self.cfg.cpu_kv_cache_bytes)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        stand_in_cache = self._profile_run()
        # the profile's stand-in KV cache for its tokens is memory the KV budget holds anyway
        peak = torch.cuda.max_memory_allocated(self.device) - stand_in_cache
        torch.cuda.empty_cache()
        budget = cuda_kv_budget(self.device, self.cfg.gpu_memory_utilization, peak)
        return num_blocks_for_bytes(self.kv_spec, budget)

    @torch.inference_mode()
    def _profile_run(self) -> int:
        """Largest step we will run, on a throwaway cache: max_num_batched_tokens new tokens,
        logits for the largest decode graph's rows, and one largest image through the encoder.
        Returns the bytes of that cache (alive through the whole run)."""
        from mistralpy.kernels.attention import AttentionMetadata

        cfg = self.cfg
        tokens = cfg.max_num_batched_tokens
        bs = cfg.block_size
        num_blocks = -(-tokens // bs)
        caches = allocate_kv_caches(self.kv_spec, num_blocks, self.device)
        vision = self.model.config.vision_config
        if vision is not None:  # text-only decoders have no encoder to profile
            side = vision.image_size - vision.image_size % (
                vision.patch_size * self.model.config.spatial_merge_size
            )
            self.model.encode_images(
                [torch.zeros(3, side, side, device=self.device, dtype=self.dtype)]
            )

        def dev(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
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
        self.model.compute_logits(hidden[: cfg.max_decode_rows])
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        del caches, hidden
        return cache_bytes


def use_cpu_kernels(model: Any) -> None:
    """Switch the model to the CPU backends: paged attention that reads a sequence's run of
    blocks in place, and layer ops with fewer dispatched ops (same numerics up to float32
    summation order; they matter on a batch-1 decode step of a small model)."""
    from mistralpy.kernels.attention import cpu_paged_attention
    from mistralpy.kernels.fused_ops import CPU_OPS

    if not hasattr(model, "set_layer_ops"):  # a test's stand-in model keeps its own
        return
    model.set_attention_backend(cpu_paged_attention)
    model.set_layer_ops(CPU_OPS)


def use_cuda_kernels(model: Any) -> Any:
    """Switch the model to the CUDA backends: Triton paged attention (flash SDPA for fresh
    prefills and the vision encoder) with the decoder's RoPE fused into its K/V store, and
    the fused Triton layer ops. Returns the paged attention backend (a `CudaPagedAttention`,
    whose decode plans can be tuned)."""
    from mistralpy.kernels.cuda_attention import CudaPagedAttention, sdpa_varlen_attention
    from mistralpy.kernels.fused_ops import triton_layer_ops

    backend = CudaPagedAttention()
    model.set_attention_backend(backend, sdpa_varlen_attention, backend.rope_and_attend)
    model.set_layer_ops(triton_layer_ops())
    return backend


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """(S, V) float32 -> (S,) int64 index of each row's first maximum. On the CPU numpy's
    vectorised argmax is ~10x faster than torch's (6 vs 65 us over 131072 logits), same result."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(axis=-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


def _greedy_verify(drafts: list[int], logits: torch.Tensor) -> list[SampledToken]:
    """`verify_drafts` for a plain greedy sequence, in one argmax and one copy to the host:
    the drafts up to the first that differs from its row's argmax, then that row's argmax
    (the same tokens: the general rule's greedy rows are one-hot at the same argmax)."""
    best = _argmax(logits[: len(drafts) + 1]).tolist()
    n = next((i for i, (d, t) in enumerate(zip(drafts, best)) if d != t), len(drafts))
    return [SampledToken(t, None, []) for t in drafts[:n] + [best[n]]]


@dataclass
class GrammarRows:
    """Allowed-token masks of the sampling rows that have a grammar (the others are free)."""

    rows: torch.Tensor  # (G,) int64: row of each mask in the step's logits
    allowed: torch.Tensor  # (G, V) bool on the device, False = forbidden


def _plain_greedy(params: SamplingParams) -> bool:
    """Temperature 0 with nothing that changes the argmax or asks for more than the token."""
    return (
        params.greedy
        and not params.logit_bias
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.repetition_penalty == 1.0
        and not params.logprobs
        and params.top_logprobs == 0
    )


# (S,) log-probs, (S, k) top ids, (S, k) top values; None where not computed
_HostLogprobs = tuple[list[float] | None, list[list[int]] | None, list[list[float]] | None]


def _host_logprobs(out: SamplerOutput) -> _HostLogprobs:
    """The sampler's log-probs, top ids and top values as host lists (None: not computed)."""
    logprobs = out.logprobs.tolist() if out.logprobs is not None else None
    top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
    top_vals = out.top_logprob_values.tolist() if out.top_logprob_values is not None else None
    return logprobs, top_ids, top_vals


def _sampled_token(
    host: _HostLogprobs, row: int, params: SamplingParams, token_id: int
) -> SampledToken:
    """Row `row`'s token with the log-probs its request asked for."""
    logprobs, top_ids, top_vals = host
    top: list[tuple[int, float]] = []
    # the sampler computes top ids and values together (both or neither)
    if top_ids is not None and top_vals is not None and params.top_logprobs > 0:
        k = params.top_logprobs
        top = list(zip(top_ids[row][:k], top_vals[row][:k]))
    want = params.logprobs or params.top_logprobs > 0
    lp = logprobs[row] if (want and logprobs is not None) else None
    return SampledToken(token_id, lp, top)


def _grammar_draft_masks(
    grammar: GrammarMatcher, drafts: list[int], vocab_size: int
) -> tuple[list[int], torch.Tensor]:
    """The drafts the grammar allows, cut at the first it forbids, and the allowed-token mask
    (K' + 1, vocab_size) bool on CPU at each verify position (after drafts [:i]). The matcher
    is rolled back: it ends in the state it started in."""
    masks, kept = [], []
    for draft in [*drafts, None]:
        masks.append(grammar.allowed_token_mask(vocab_size))
        if draft is None or not bool(masks[-1][draft]) or grammar.is_finished():
            break
        if not grammar.accept(draft):  # the mask allowed it: only an llguidance fault
            raise RuntimeError(f"grammar rejected allowed token {draft}: {grammar.error}")
        kept.append(draft)
    if kept:
        grammar.rollback(len(kept))
    return kept, torch.stack(masks)


def _sample_rows(seqs: list[SeqWork]) -> dict[str, slice]:
    """The logits rows of each sampling sequence of a step, by seq_id: one for a plain
    sequence, K + 1 for one verifying K drafts, consecutive in `seqs` order."""
    rows, start = {}, 0
    for s in seqs:
        end = start + 1 + len(s.spec.draft_ids)
        rows[s.seq_id] = slice(start, end)
        start = end
    return rows


def _ends_on_length(seq: SeqWork) -> bool:
    """Whether the token sampled now is the sequence's last by max_tokens."""
    max_tokens = seq.spec.params.max_tokens
    return max_tokens is not None and len(seq.spec.output_ids) + 1 >= max_tokens


class _LaunchAhead:
    """A decode step launched ahead: the rows of `seqs`, each one token further."""

    def __init__(self, seqs: list[SeqWork], bucket: int):
        self.seqs = seqs
        self.bucket = bucket
        self.tokens: list[int] = []  # the tokens fed in, known once the step's sync returns
        self.rows = {s.seq_id: i for i, s in enumerate(seqs)}

    def match(self, seqs: list[SeqWork]) -> list[int] | None:
        """Row of each of `seqs` in the launched step, if they are that step's rows (all, or
        some, in the same order: sequences that finished drop out) with the same inputs."""
        rows: list[int] = []
        for s in seqs:
            row = self.rows.get(s.seq_id)
            if row is None or (rows and row <= rows[-1]):
                return None
            old = self.seqs[row]
            if (
                s.start_pos != old.start_pos + 1
                or s.token_ids != [self.tokens[row]]
                or s.block_table[: len(old.block_table)] != old.block_table
            ):
                return None
            rows.append(row)
        return rows
