"""Engine configuration: a frozen, validated dataclass of plain values, plus model resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mistralpy.engine.speculative import SpeculativeConfig
from mistralpy.model.config import MODEL_DTYPES
from mistralpy.params import check_param

DEMO_MODEL = "demo"
DTYPES = ("auto", *MODEL_DTYPES)
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; "auto" = the model dtype


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to build itself. Validated at construction."""

    model: str = DEMO_MODEL  # local dir or .gguf, named model ("smollm2"), hub id, or "demo"
    mmproj: str | None = None  # a GGUF model's llama.cpp vision file (Pixtral + projector)
    revision: str | None = None  # hub revision; ignored for local dirs
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    isq: str | None = None  # in-situ quantization format name, applied at load
    load_format: str = "auto"  # "dummy": random weights (benchmarks), no checkpoint read
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 32  # sequences in one step
    max_num_batched_tokens: int = 8192  # new tokens in one step (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block (power of two)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of total memory we may use
    cpu_kv_cache_bytes: int = 1 << 30  # CPU: bytes for the KV cache
    num_kv_blocks: int | None = None  # overrides the memory-derived block count (tests, tuning)
    enable_prefix_caching: bool = True
    encoder_cache_size: int = 16384  # image-embedding rows kept by the encoder-output LRU
    seed: int = 0  # seeds requests that carry no seed of their own
    tensor_parallel_size: int = 1  # ranks the decoder is split over (one process per device)
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs / tuned GEMVs (debugging, A/B)
    kv_cache_dtype: str = "auto"  # "fp8"/"fp8_e4m3": e4m3 KV + per-layer scales, 2x the tokens
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding

    def __post_init__(self) -> None:
        check_param(bool(self.model), "model", "must be a path, hub id, 'smollm2' or 'demo'")
        check_param(
            self.mmproj is None or self.mmproj.endswith(".gguf"), "mmproj", "must be a .gguf file"
        )
        check_param(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        check_param(
            self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}"
        )
        check_param(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {KV_CACHE_DTYPES}",
        )
        check_param(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            "device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        check_param(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", ">= 2")
        check_param(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check_param(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        check_param(
            1 <= self.block_size <= 1024 and self.block_size & (self.block_size - 1) == 0,
            "block_size",
            "must be a power of two in [1, 1024]",
        )
        check_param(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            "must be in (0, 1]",
        )
        check_param(self.cpu_kv_cache_bytes > 0, "cpu_kv_cache_bytes", "must be > 0")
        check_param(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", ">= 1")
        check_param(self.encoder_cache_size >= 0, "encoder_cache_size", "must be >= 0")
        check_param(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        spec = self.speculative_config
        check_param(
            spec is None or spec.model is None or self.tensor_parallel_size == 1,
            "speculative_config",
            "with a draft model needs tensor_parallel_size 1",
        )


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """Local path of `model`: "demo" (the tiny random checkpoint, built once), else what
    `checkpoint.hub.local_model_path` finds (dir, GGUF file, named model, hub id). The one
    resolver every command uses (quantize included)."""
    if model == DEMO_MODEL:
        # Imported here: the tiny checkpoint writer is only needed for the demo model.
        from mistralpy.testing.tiny_checkpoint import ensure_demo_checkpoint

        return Path(ensure_demo_checkpoint())
    from mistralpy.checkpoint.hub import local_model_path

    return local_model_path(model, revision)
