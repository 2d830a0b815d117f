"""CPU decode steps of a GGUF-quantized model through one compiled call
(`kernels.cpu_decode`), instead of the layer-by-layer torch forward.

Used for pure decode steps (one token per sequence, no image rows) of at most
`FusedCpuDecode.max_rows` sequences when every linear of the text decoder and lm_head is a
`QuantizedLinear` in one format that has a numba GEMV on this host (q4k with AVX-512 VNNI,
q8_0) and the model runs in float32. Anything else keeps the torch path, which stays the
reference: tests check the two against each other and against transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mistralpy.model.layers import rope_inv_freq
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration, MistralDecoderLayer
from mistralpy.params import SamplingParams
from mistralpy.quant.isq import CPU_GEMV_MAX_M, QuantizedLinear
from mistralpy.runner.batch import SampleSpec, SeqWork

FUSED_FORMATS = ("q4k", "q8_0")


class FusedCpuDecode:
    """Logits of a decode step for up to `max_rows` sequences, K/V written into the caches."""

    max_rows = CPU_GEMV_MAX_M  # the GGUF GEMVs' batch limit (larger batches: int4 GEMM)

    def __init__(self, step: Any, model: Any, fmt: str, kv_caches: list[torch.Tensor]):
        from mistralpy.kernels.cpu_decode import typed_list

        text = model.config.text_config
        lm = model.language_model
        layers = list(lm.layers)
        self.fmt = fmt
        self._step = step
        self._embed = lm.embed_tokens.weight.detach().numpy()
        cpu = torch.device("cpu")
        self._inv_freq = rope_inv_freq(text.rope_theta, text.head_dim, cpu).numpy()
        self._in_norms = _stack([ly.input_layernorm.weight for ly in layers])
        self._post_norms = _stack([ly.post_attention_layernorm.weight for ly in layers])
        self._final_norm = lm.norm.weight.detach().numpy()

        def weights(get: Any) -> Any:
            return typed_list([get(ly).qweight.numpy() for ly in layers])

        self._qkv = weights(lambda ly: ly.self_attn.qkv_proj)
        self._o = weights(lambda ly: ly.self_attn.o_proj)
        self._gate_up = weights(lambda ly: ly.mlp.gate_up_proj)
        self._down = weights(lambda ly: ly.mlp.down_proj)
        self._lm = model.lm_head.qweight.numpy()
        self._caches = typed_list([c.numpy() for c in kv_caches])
        self._dims = (
            text.num_attention_heads,
            text.num_key_value_heads,
            text.head_dim,
            text.intermediate_size,
            float(text.rms_norm_eps),
            float(text.head_dim**-0.5),
        )
        self.vocab_size = text.vocab_size
        self._logits: dict[int, np.ndarray] = {}

    @classmethod
    def build(cls, model: Any, kv_caches: list[torch.Tensor]) -> FusedCpuDecode | None:
        """The fused decoder for `model`, or None when it does not apply (see the module doc)."""
        fmt = fused_format(model, kv_caches)
        if fmt is None:
            return None
        from mistralpy.kernels.cpu_decode import step_function

        step = step_function(fmt)
        if step is None:
            return None
        fused = cls(step, model, fmt, kv_caches)
        fused.compile()
        return fused

    def compile(self) -> None:
        """Compile the step now (numba compiles on the first call, ~1-2 s), not in the first
        request's first decode step: one step for token 0 at position 0 of block 0. The K/V
        it writes there are harmless: a sequence reads only positions it has written itself."""
        spec = SampleSpec(SamplingParams(max_tokens=1), [], [], None)
        self([SeqWork("compile", [0], 0, [0], [], spec)], block_size=1)

    def accepts(self, seqs: Sequence[SeqWork]) -> bool:
        """A pure decode step of at most max_rows sequences, each sampling, no image rows."""
        return 0 < len(seqs) <= self.max_rows and all(
            len(s.token_ids) == 1 and s.sample is not None and not s.images for s in seqs
        )

    def __call__(self, seqs: Sequence[SeqWork], block_size: int) -> torch.Tensor:
        """Logits (len(seqs), vocab) float32 of the step, valid until the next call (the runner
        samples from them at once); writes each row's K/V at its position."""
        m = len(seqs)
        ids = np.array([s.token_ids[0] for s in seqs], np.int64)
        pos = np.array([s.start_pos for s in seqs], np.int64)
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((m, width), np.int32)
        for i, s in enumerate(seqs):
            assert len(s.block_table) * block_size > s.start_pos
            tables[i, : len(s.block_table)] = s.block_table
        if ids.min() < 0 or ids.max() >= self._embed.shape[0]:
            raise ValueError("token id outside the vocabulary")
        logits = self._logits.get(m)
        if logits is None:  # one buffer per row count, reused: a fresh 512 KB+ array per step
            # comes from new pages the kernel must fault in and zero (~0.1 ms a step)
            logits = self._logits[m] = np.empty((m, self._lm.shape[0]), np.float32)
        self._step(
            ids, pos, tables, self._embed, self._inv_freq, self._in_norms, self._post_norms,
            self._final_norm, self._qkv, self._o, self._gate_up, self._down, self._lm,
            self._caches, *self._dims, logits,
        )  # fmt: skip
        return torch.from_numpy(logits)


def fused_format(model: Any, kv_caches: list[torch.Tensor]) -> str | None:
    """The one GGUF format of every text linear and lm_head when the fused step can run this
    model (float32 CPU weights and caches, SiLU MLP, no tensor parallelism), else None."""
    if not isinstance(model, Mistral3ForConditionalGeneration):  # e.g. a test's stand-in
        return None
    text, lm = model.config.text_config, model.language_model
    if text.hidden_act != "silu" or model.vocab_parallel or model.parallel.world_size != 1:
        return None
    if any(
        c.dtype != torch.float32 or c.device.type != "cpu" or not c.is_contiguous()
        for c in kv_caches
    ):  # the step's attention reads float32 K/V rows through raw addresses: an fp8 cache
        # (e4m3 + scales) would need a decode in its IR block kernels, so it keeps the layer path
        return None
    floats = [lm.embed_tokens.weight, lm.norm.weight]
    modules: list[nn.Module] = [model.lm_head]
    for ly in lm.layers:
        if not isinstance(ly, MistralDecoderLayer):  # a stand-in layer the step cannot read
            return None
        floats += [ly.input_layernorm.weight, ly.post_attention_layernorm.weight]
        attn, mlp = ly.self_attn, ly.mlp
        modules += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in floats):
        return None
    linears = [m for m in modules if isinstance(m, QuantizedLinear)]
    if len(linears) != len(modules):
        return None
    fmts = {lin.fmt.name for lin in linears}
    if len(fmts) != 1 or next(iter(fmts)) not in FUSED_FORMATS:
        return None
    if any(
        lin.bias is not None or lin.qweight is None or not lin.qweight.is_contiguous()
        for lin in linears
    ):
        return None
    return next(iter(fmts))


def _stack(weights: list[torch.Tensor]) -> np.ndarray:
    """(L, H) float32 copy of per-layer norm weights (a few KB)."""
    return torch.stack([w.detach() for w in weights]).numpy()
