"""Build a mistral3 model and fill it from safetensors, streaming one tensor at a time.

The model is built on the `meta` device; non-Linear parameters are materialised with
`to_empty` on the target device, and every `nn.Linear` gets its weight only once its tensor is
complete (fused `qkv_proj` / `gate_up_proj` parts gathered). At that moment an optional ISQ
factory may replace the Linear by a quantized module, so the full-precision copy of one layer
at most is alive. Source tensors come from memory-mapped files (`safe_open`), converted to the
target dtype/device as they are copied into place: peak memory is about the model size (plus
the reclaimable page cache of the shard being read), never two copies.

Tensor parallelism: given a `ParallelConfig`, the model is built with this rank's shapes and
each sharded tensor is read as this rank's slice only (`get_slice` on the memory-mapped file;
fused parts sliced before they are placed), so the ISQ hook sees the rank's shard.

Two checkpoint layouts are understood:
- HF (`config.json` + `*.safetensors` [+ index]); keys either `language_model.model.*` /
  `language_model.lm_head.*` / `vision_tower.*` / `multi_modal_projector.*` or transformers-5
  `model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*` / `lm_head.*`;
  text-only `LlamaForCausalLM` / `MistralForCausalLM`: `model.*` / `lm_head.*`.
- Mistral native (`params.json` + `consolidated*.safetensors`), whose q/k rows are in the
  interleaved rotary order and are permuted into HF's rotate-half order here.
A directory with a `quantization.json` (written by `quantize_checkpoint` / `mistralpy
quantize`) holds our own module names and already-quantized layers: those are rebuilt as
QuantizedLinear straight from their stored bytes, nothing is quantized again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from mistralpy.errors import UserError
from mistralpy.model.config import Mistral3Config, read_config
from mistralpy.model.layers import MergedLinear, RMSNorm
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
from mistralpy.model.parallel import SINGLE, ParallelConfig, Shard

if TYPE_CHECKING:
    # (module_path, weight (out, in), bias (out,) | None) -> replacement module, or None to
    # keep the plain nn.Linear; quant is imported lazily at run time (it may pull in kernels)
    from mistralpy.quant.isq import LinearFactory

DUMMY_STD = 0.02  # matches the checkpoints' initializer_range


class CheckpointError(UserError):
    """The checkpoint's files or tensors do not match the model its config describes."""


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    isq: str | None = None,
    load_format: str = "auto",  # checked below: "auto" or "dummy"
    parallel: ParallelConfig = SINGLE,
    dequantize: bool = False,
    mmproj: str | Path | None = None,
) -> Mistral3ForConditionalGeneration:
    """Model of the checkpoint directory (or GGUF file) `path` with weights in `dtype` on
    `device`.

    isq: an in-situ quantization name handed to `mistralpy.quant.isq.isq_linear_factory`.
    load_format "dummy": random weights of the config's shapes; only the config is read.
    parallel: tensor-parallel rank to build and load (its shard of the decoder only).
    dequantize: GGUF only: dequantize its block-quantized tensors into `dtype` instead of
    serving them in their own formats (an explicit --dtype asks for this).
    mmproj: GGUF only: llama.cpp's vision file adding the Pixtral encoder + projector.
    """
    path = Path(path)
    config = read_config(path, mmproj)
    if load_format == "dummy":
        return load_dummy_model(config, dtype, device, isq, parallel=parallel)
    if load_format != "auto":
        raise CheckpointError(f"load_format {load_format!r} is not 'auto' or 'dummy'")
    if path.suffix == ".gguf":
        if parallel.world_size > 1:
            raise CheckpointError("tensor parallelism is not supported for GGUF models")
        from mistralpy.checkpoint.gguf import load_gguf_model

        return load_gguf_model(
            str(path), dtype, device, isq, dequantize, None if mmproj is None else str(mmproj)
        )
    from mistralpy.quant.prequantized import read_quantization_config  # lazy, as ISQ

    qconfig = read_quantization_config(path)
    if qconfig is not None:
        if parallel.world_size > 1:
            raise CheckpointError(
                f"{path} is pre-quantized; tensor parallelism needs the full-precision checkpoint "
                "(load it with --isq instead)"
            )
        return _load_prequantized(path, config, qconfig, dtype, torch.device(device), isq)
    files, native = _checkpoint_files(path)
    model = _empty_model(config, dtype, torch.device(device), parallel)
    filler = _Filler(model, _isq_factory(isq))
    plan = _plan(model, files, native)
    isq_note = f" + ISQ {isq}" if isq else ""
    for file, keys in plan.by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            bar = tqdm(keys, desc=f"Loading {file.name}{isq_note}", unit="tensor", leave=False)
            for key in bar:
                target = plan.targets[key]
                if isq and not filler.replaced:
                    bar.set_postfix_str(FIRST_QUANTIZED_NOTE, refresh=True)
                filler.put(target, _transform(_read(f, key, target.shard), target))
                if isq:
                    bar.set_postfix_str(f"quantized {filler.replaced} layers", refresh=False)
    if plan.tie_lm_head:
        filler.tie_lm_head()
    return _quantized_embedding(filler.finish(), isq)


def load_dummy_model(
    config: Mistral3Config,
    dtype: torch.dtype,
    device: torch.device | str,
    isq: str | None = None,
    seed: int = 0,
    parallel: ParallelConfig = SINGLE,
) -> Mistral3ForConditionalGeneration:
    """Model with random weights (normal, std 0.02; norms 1; biases 0), each allocated once on
    `device`. Every tensor is a function of (its name, its full shape, `seed`, the device
    type): under tensor parallelism each rank holds its slice of the same model as tp=1, drawn
    alone (see `dummy_tensor`)."""
    device = torch.device(device)
    model = _empty_model(config, dtype, device, parallel)
    # meta (shape checks of the real config without memory) has no generator
    gen = None if device.type == "meta" else torch.Generator(device=device)
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.device.type == "meta":
                continue  # a Linear's tensors are created below
            if isinstance(module, RMSNorm):
                param.data.fill_(1.0)
            else:
                name = f"{module_name}.{pname}"
                param.data.copy_(dummy_tensor(name, param.shape, None, dtype, gen, seed))
    filler = _Filler(model, _isq_factory(isq))
    for name, linear in _linears(model):
        bias = (
            None
            if linear.bias is None
            else torch.zeros(linear.bias.shape, dtype=dtype, device=device)
        )
        filler.finalize(name, _dummy_weight(name, linear, dtype, gen, seed), bias)
    return _quantized_embedding(filler.finish(), isq)


DUMMY_BLOCK = 256  # rows (or columns) of a dummy tensor drawn from one seed


def dummy_tensor(
    name: str,
    full_shape: tuple[int, ...] | torch.Size,
    shard: Shard | None,
    dtype: torch.dtype,
    gen: torch.Generator | None,
    seed: int = 0,
) -> torch.Tensor:
    """`shard` (None: all) of tensor `name`, N(0, DUMMY_STD) of `full_shape`, on `gen`'s
    device. The full tensor is cut into blocks of DUMMY_BLOCK along the shard's dim, each
    drawn from its own seed (name, block, seed): a rank draws only the blocks its slice
    overlaps, the same values whatever the rank count. gen None: uninitialised, on meta."""
    dim = shard.dim if shard is not None else 0
    full = full_shape[dim]
    start, size = (shard.start, shard.size) if shard is not None else (0, full)
    shape = list(full_shape)
    shape[dim] = size
    if gen is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    out = torch.empty(shape, dtype=dtype, device=gen.device)
    for block in range(start // DUMMY_BLOCK, -(-(start + size) // DUMMY_BLOCK)):
        lo = block * DUMMY_BLOCK
        shape[dim] = min(DUMMY_BLOCK, full - lo)
        gen.manual_seed(_block_seed(name, block, seed))
        # drawn whole and contiguous, then cut: the values never depend on the slice taken
        values = torch.empty(shape, dtype=dtype, device=gen.device)
        values.normal_(0.0, DUMMY_STD, generator=gen)
        a, b = max(lo, start), min(lo + shape[dim], start + size)
        out.narrow(dim, a - start, b - a).copy_(values.narrow(dim, a - lo, b - a))
    return out


def _block_seed(name: str, block: int, seed: int) -> int:
    """A stable 63-bit seed (Python's hash() differs per process; ranks must agree)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _dummy_weight(
    name: str, linear: nn.Linear, dtype: torch.dtype, gen: torch.Generator | None, seed: int
) -> torch.Tensor:
    """Linear `name`'s weight (this rank's rows/columns): fused parts each drawn as their
    own checkpoint tensor (named like the checkpoint's unfused projections), then joined."""
    shards = getattr(linear, "tp_shards", None)
    if not isinstance(linear, MergedLinear):
        shard = shards[0] if shards else None
        return dummy_tensor(f"{name}.weight", _full_shape(linear, shard), shard, dtype, gen, seed)
    parts = []
    for part, rows in enumerate(linear.output_sizes):
        shard = shards[part] if shards else Shard(0, 0, rows, rows)
        full = (shard.full, linear.in_features)
        parts.append(dummy_tensor(f"{_unfused_name(name, part)}.weight", full, shard, dtype, gen,
                                  seed))  # fmt: skip
    return torch.cat(parts)


def _full_shape(linear: nn.Linear, shard: Shard | None) -> tuple[int, int]:
    """(out, in) of the checkpoint tensor whose `shard` the Linear holds."""
    shape = [linear.out_features, linear.in_features]
    if shard is not None:
        shape[shard.dim] = shard.full
    return shape[0], shape[1]


# ---------------------------------------------------------------------------------------------
# Building the empty model


def _empty_model(
    config: Mistral3Config, dtype: torch.dtype, device: torch.device, parallel: ParallelConfig
) -> Mistral3ForConditionalGeneration:
    """The model (this rank's shard) with Linear weights left on `meta` and every other
    parameter allocated (uninitialised) on `device` in `dtype`."""
    with torch.device("meta"), _SkipInitialisers():
        model = Mistral3ForConditionalGeneration(config, parallel=parallel)
    model.to(dtype)  # on meta: only changes the recorded dtype
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            module.to_empty(device=device, recurse=False)
    return model.eval().requires_grad_(False)


class _SkipInitialisers(TorchFunctionMode):
    """Within it, `torch.nn.init.*_` initialisers return their tensor untouched. Modules'
    `reset_parameters` would only draw values on `meta` that loading replaces, and the first
    meta `normal_` of a process imports torch's reference decompositions: ~1.1 s and ~75 MiB."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _isq_factory(isq: str | None) -> LinearFactory | None:
    if isq is None:
        return None
    from mistralpy.quant.isq import isq_linear_factory  # lazy: quant may pull in kernels

    return isq_linear_factory(isq)


# ---------------------------------------------------------------------------------------------
# Placing tensors


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes."""

    module: str  # our module path, e.g. "language_model.layers.0.self_attn.qkv_proj"
    param: str  # "weight" or "bias"
    part: int | None = None  # part index inside a MergedLinear
    rope_heads: int | None = None  # native q/k: heads to permute into rotate-half order
    shard: Shard | None = None  # tensor parallelism: the slice of the tensor this rank reads


@dataclass
class _PendingLinear:
    """A Linear whose weight (and bias) are being assembled from parts."""

    tensors: dict[str, torch.Tensor]
    todo: set[tuple[str, int | None]]


class _Filler:
    """Copies tensors into the model, finishing each Linear (ISQ hook) once complete."""

    def __init__(self, model: Mistral3ForConditionalGeneration, factory: LinearFactory | None):
        self.model = model
        self.factory = factory
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.device = model.language_model.embed_tokens.weight.device
        self.dtype = model.language_model.embed_tokens.weight.dtype
        self.pending: dict[str, _PendingLinear] = {}
        self.replaced = 0  # Linears the factory swapped (progress display)

    def put(self, target: _Target, tensor: torch.Tensor) -> None:
        """Copy `tensor` (any dtype, on CPU) into its place, converting on the way."""
        module = self.modules[target.module]
        if not isinstance(module, nn.Linear):
            self.params[f"{target.module}.{target.param}"].data.copy_(tensor)
            return
        pending = self.pending.get(target.module) or self._start(target.module, module)
        dest = pending.tensors[target.param]
        if target.part is not None:
            assert isinstance(module, MergedLinear)
            start = sum(module.output_sizes[: target.part])
            dest = dest[start : start + module.output_sizes[target.part]]
        dest.copy_(tensor)
        pending.todo.discard((target.param, target.part))
        if not pending.todo:
            del self.pending[target.module]
            self.finalize(target.module, pending.tensors["weight"], pending.tensors.get("bias"))

    def _start(self, name: str, linear: nn.Linear) -> _PendingLinear:
        parts = range(len(linear.output_sizes)) if isinstance(linear, MergedLinear) else [None]
        tensors = {"weight": torch.empty(linear.weight.shape, dtype=self.dtype, device=self.device)}
        todo = {("weight", p) for p in parts}
        if linear.bias is not None:
            tensors["bias"] = torch.empty(linear.bias.shape, dtype=self.dtype, device=self.device)
            todo |= {("bias", p) for p in parts}
        self.pending[name] = _PendingLinear(tensors, todo)
        return self.pending[name]

    def finalize(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Install the complete weight (out, in) / bias of Linear `name`, or its ISQ swap."""
        replacement = self.factory(name, weight, bias) if self.factory else None
        if isinstance(replacement, nn.Module):
            self.model.set_submodule(name, replacement)
            self.replaced += 1
            return
        linear = self.modules[name]
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)

    def tie_lm_head(self) -> None:
        """lm_head shares the input embedding (config.tie_word_embeddings, no lm_head key);
        a vocab-parallel lm_head shares this rank's rows of it."""
        weight = self.model.language_model.embed_tokens.weight
        shard = _shard_of(self.model, _Target("lm_head", "weight"))
        if shard is not None:
            weight = weight.narrow(shard.dim, shard.start, shard.size)
        self.finalize("lm_head", weight, None)

    def finish(self) -> Mistral3ForConditionalGeneration:
        assert not self.pending, f"incomplete linears: {sorted(self.pending)}"
        if self.device.type != "meta":
            left = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
            assert not left, f"{len(left)} parameters never loaded, e.g. {left[:5]}"
        return self.model


def _read(f: Any, key: str, shard: Shard | None) -> torch.Tensor:
    """Tensor `key` of the open safetensors file `f` (safe_open), or only its `shard` slice."""
    if shard is None:
        return f.get_tensor(key)
    view = f.get_slice(key)
    index = [slice(None)] * len(view.get_shape())
    index[shard.dim] = slice(shard.start, shard.start + shard.size)
    return view[tuple(index)]


def _transform(tensor: torch.Tensor, target: _Target) -> torch.Tensor:
    """Native q/k (heads * D, in) rows from interleaved-pair to rotate-half order per head
    (a shard holds whole heads, so the permutation applies to its rows alone)."""
    if target.rope_heads is None:
        return tensor
    heads = target.rope_heads
    if target.shard is not None:
        heads = heads * target.shard.size // target.shard.full
    return rotate_half_rows(tensor, heads)


def interleave_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rotate_half_rows`: HF rotate-half q/k rows to llama.cpp's interleaved
    order (what its converter writes into a GGUF)."""
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k weight rows (heads * D, cols) from interleaved-pair RoPE order (Mistral native,
    llama.cpp's GGUF permutation) to HF's rotate-half order, per head. Rows move whole, so
    this applies as well to rows of quantized GGUF blocks (uint8 bytes per row)."""
    rows, cols = tensor.shape
    return tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Pre-quantized directories


def _load_prequantized(
    path: Path, config: Mistral3Config, qconfig, dtype: torch.dtype, device: torch.device,
    isq: str | None,
) -> Mistral3ForConditionalGeneration:  # fmt: skip
    """Model of a `quantization.json` directory: stored QuantizedLinear bytes go to the
    device as they are (their kernels are built there), other tensors like any checkpoint."""
    from mistralpy.quant.formats import get_format
    from mistralpy.quant.prequantized import WEIGHTS_FILE, load_prequantized_linear
    from mistralpy.quant.tuning import KernelTuning

    if isq is not None and get_format(isq).name != qconfig.format:
        raise CheckpointError(
            f"isq={isq!r}: {path} is already quantized as {qconfig.format}; drop --isq"
        )
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"pre-quantized checkpoint {path} has no {WEIGHTS_FILE}")
    model = _empty_model(config, dtype, device, SINGLE)
    filler = _Filler(model, None)
    parts: dict[str, dict[str, torch.Tensor]] = {}  # Linear path -> tensors read so far
    tuning = KernelTuning()
    with safe_open(str(file), framework="pt", device="cpu") as f:
        desc = f"Loading {file.name} (pre-quantized {qconfig.format})"
        bar = tqdm(list(f.keys()), desc=desc, unit="tensor", leave=False)
        bar.set_postfix_str(FIRST_QUANTIZED_NOTE, refresh=True)
        for key in bar:
            module, param = key.rsplit(".", 1)
            layer = qconfig.layers.get(module)
            linear = filler.modules.get(module)
            if layer is None and not isinstance(linear, nn.Linear):
                if not _has_param(model, _Target(module, param)):
                    raise CheckpointError(f"pre-quantized checkpoint: unexpected key {key}")
                filler.put(_Target(module, param), f.get_tensor(key))
                continue
            tensor = f.get_tensor(key)
            got = parts.setdefault(module, {})
            got[param] = tensor.to(device) if param == "qweight" else tensor.to(device, dtype)
            if layer is not None and "qweight" in got and ("bias" in got) == layer.bias:
                model.set_submodule(module, load_prequantized_linear(module, got, qconfig, tuning))
                del parts[module]
                bar.set_postfix_str("", refresh=False)
            elif (
                isinstance(linear, nn.Linear)  # always, without a quantized layer (see above)
                and "weight" in got
                and ("bias" in got) == (linear.bias is not None)
            ):
                filler.finalize(module, got["weight"], got.get("bias"))
                del parts[module]
    missing = sorted(parts) + [
        n for n in qconfig.layers if isinstance(submodule(model, n), nn.Linear)
    ]
    if missing:
        raise CheckpointError(f"pre-quantized checkpoint: incomplete layers {missing[:5]}")
    return _quantized_embedding(filler.finish(), qconfig.format)


def _quantized_embedding(model: Mistral3ForConditionalGeneration, isq: str | None):
    """On CUDA, a quantized model's token embedding in the same format (one lookup
    dequantizes the rows it reads); elsewhere as is (the CPU fused decode reads the float
    table, and CPU memory is less tight)."""
    emb = model.language_model.embed_tokens
    if isq is None or emb.weight.device.type != "cuda":
        return model
    from mistralpy.quant.isq import quantize_embedding

    model.language_model.set_submodule("embed_tokens", quantize_embedding(emb, isq))
    return model


# Shown while the first quantized layer loads: it compiles and times the quantized kernels
# (10-20 s on a GPU), which a progress bar would otherwise show as a stall with a
# many-minute estimate.
FIRST_QUANTIZED_NOTE = "first quantized layer: compiling and tuning kernels (once per load)"


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """`model.get_submodule(name)`, or None where the model has no such module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def quantize_checkpoint(
    path: str | Path, out_dir: str | Path, isq: str, device: torch.device | str = "cpu"
) -> Path:
    """Load `path` with ISQ `isq` on `device` and write a complete pre-quantized model
    directory `out_dir` (weights, quantization.json, config/tokenizer/template files);
    full-precision tensors keep the checkpoint's stored dtype (bfloat16 if unstated)."""
    from mistralpy.quant.prequantized import copy_model_files, save_quantized

    path, out = Path(path), Path(out_dir)
    dtype = getattr(torch, read_config(path).dtype or "bfloat16")
    model = load_model(path, dtype, device, isq=isq)
    save_quantized(model, out, isq)
    copy_model_files(path, out)
    return out


# ---------------------------------------------------------------------------------------------
# Files and key mapping


@dataclass
class _Plan:
    targets: dict[str, _Target] = field(default_factory=dict)  # checkpoint key -> target
    by_file: dict[Path, list[str]] = field(default_factory=dict)
    tie_lm_head: bool = False


def _checkpoint_files(path: Path) -> tuple[list[Path], bool]:
    """Safetensors files of the checkpoint and whether they are in Mistral's native layout."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if (path / "config.json").is_file():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(p for p in path.glob("*.safetensors") if "consolidated" not in p.name)
        native = False
    else:
        files = sorted(path.glob("consolidated*.safetensors"))
        native = True
    if not files:
        raise CheckpointError(f"no safetensors weights found in {path}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint files listed in the index are missing: {missing}")
    return files, native


def _plan(model: Mistral3ForConditionalGeneration, files: list[Path], native: bool) -> _Plan:
    """Map every checkpoint key to its target; fail naming missing/unexpected/misshapen keys."""
    plan = _Plan()
    unexpected, wrong_shape = [], []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        plan.by_file[file] = []
        for key in keys:
            target = _map_key(key, model.config, native)
            if target is None or not _has_param(model, target):
                unexpected.append(key)
                continue
            target = replace(target, shard=_shard_of(model, target))
            module = model.get_submodule(target.module)
            expected = expected_shape(module, target.param, target.part, target.shard)
            if shapes[key] != expected:
                wrong_shape.append(f"{key} {shapes[key]} != {expected}")
            plan.targets[key] = target
            plan.by_file[file].append(key)
    missing = _missing(model, list(plan.targets.values()))
    if missing == ["lm_head.weight"] and model.config.tie_word_embeddings:
        plan.tie_lm_head, missing = True, []
    check_match("checkpoint does not match config", missing, unexpected, wrong_shape)
    return plan


def check_match(what: str, missing: list, unexpected: list, wrong_shape: list) -> None:
    """Raise CheckpointError `what: ...` naming every missing, unexpected and misshapen
    tensor, if there is any."""
    problems = [
        f"missing keys: {missing}" if missing else "",
        f"unexpected keys: {unexpected}" if unexpected else "",
        f"wrong shapes: {wrong_shape}" if wrong_shape else "",
    ]
    if any(problems):
        raise CheckpointError(f"{what}: " + "; ".join(filter(None, problems)))


def _has_param(model: nn.Module, target: _Target) -> bool:
    module = submodule(model, target.module)
    return isinstance(getattr(module, target.param, None), nn.Parameter) and (
        target.part is None or isinstance(module, MergedLinear)
    )


def expected_shape(
    module: nn.Module, param: str, part: int | None, shard: Shard | None = None
) -> tuple[int, ...]:
    """Shape a checkpoint tensor of `module.param` must have: `part` of a fused module's rows,
    whole before any sharding (safetensors and GGUF loaders alike)."""
    shape = list(module.get_parameter(param).shape)
    if part is not None:
        assert isinstance(module, MergedLinear), (module, part)
        shape[0] = module.output_sizes[part]
    if shard is not None:
        shape[shard.dim] = shard.full
    return tuple(shape)


def _shard_of(model: nn.Module, target: _Target) -> Shard | None:
    """The slice of `target`'s checkpoint tensor this rank holds; None for the whole tensor.
    A bias follows its weight's row split; row-parallel layers have no bias in mistral3."""
    shards = getattr(model.get_submodule(target.module), "tp_shards", None)
    if shards is None:
        return None
    shard = shards[target.part or 0]
    if shard.size == shard.full or (target.param == "bias" and shard.dim != 0):
        return None
    return shard


def _missing(model: nn.Module, targets: list[_Target]) -> list[str]:
    """Parameters (named with the unfused part names for fused ones) that no tensor targets."""
    have = {(t.module, t.param, t.part) for t in targets}
    missing = []
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            parts = range(len(module.output_sizes)) if isinstance(module, MergedLinear) else [None]
            missing += [
                f"{name if part is None else _unfused_name(name, part)}.{pname}"
                for part in parts
                if (name, pname, part) not in have
            ]
    return missing


# HF (unfused) projection name -> (our fused module, part)
_PACKED_PARTS = Mistral3ForConditionalGeneration.packed_modules_mapping


def _unfused_name(fused_path: str, part: int) -> str:
    """ "x.qkv_proj", 1 -> "x.k_proj": the checkpoint's name for one part of a fused Linear."""
    parent, fused = fused_path.rsplit(".", 1)
    for name, (target, index) in _PACKED_PARTS.items():
        if target == fused and index == part:
            return f"{parent}.{name}"
    raise AssertionError(fused_path)


# Checkpoint prefixes (both HF styles) -> our module prefixes.
_HF_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.", "language_model."),  # text-only LlamaForCausalLM / MistralForCausalLM
)

# Mistral-native key patterns -> HF-style (unfused) names under our prefixes.
_NATIVE_KEYS = (
    (r"^tok_embeddings\.", "language_model.embed_tokens."),
    (r"^norm\.", "language_model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention_norm\.", r"language_model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"language_model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"language_model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"language_model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"language_model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"language_model.layers.\1.mlp.up_proj."),
    (r"^vision_encoder\.(patch_conv|ln_pre)\.", r"vision_tower.\1."),
    (
        r"^vision_encoder\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.",
        r"vision_tower.transformer.layers.\1.\2.",
    ),
    (
        r"^vision_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkvo])\.",
        r"vision_tower.transformer.layers.\1.attention.\2_proj.",
    ),
    (
        r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.",
        r"vision_tower.transformer.layers.\1.feed_forward.gate_proj.",
    ),
    (
        r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.",
        r"vision_tower.transformer.layers.\1.feed_forward.down_proj.",
    ),
    (
        r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.",
        r"vision_tower.transformer.layers.\1.feed_forward.up_proj.",
    ),
    (r"^vision_language_adapter\.w_in\.", "multi_modal_projector.linear_1."),
    (r"^vision_language_adapter\.w_out\.", "multi_modal_projector.linear_2."),
    (r"^patch_merger\.", "multi_modal_projector.patch_merger."),
    (r"^pre_mm_projector_norm\.", "multi_modal_projector.norm."),
)


def _map_key(key: str, config: Mistral3Config, native: bool) -> _Target | None:
    """Target of checkpoint `key`, or None when the key belongs to no parameter of ours."""
    name = _native_to_hf(key) if native else _strip_hf_prefix(key)
    if name is None or "." not in name:
        return None
    module, param = name.rsplit(".", 1)
    parent, leaf = module.rsplit(".", 1) if "." in module else ("", module)
    part = None
    if leaf in _PACKED_PARTS:
        fused, part = _PACKED_PARTS[leaf]
        module = f"{parent}.{fused}"
    rope_heads = None
    if native and leaf in ("q_proj", "k_proj") and param == "weight":
        rope_heads = _rope_heads(module, leaf, config)
    return _Target(module, param, part, rope_heads)


def _strip_hf_prefix(key: str) -> str | None:
    for prefix, ours in _HF_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    return None


def _native_to_hf(key: str) -> str | None:
    for pattern, repl in _NATIVE_KEYS:
        name, n = re.subn(pattern, repl, key)
        if n:
            return name
    return None


def _rope_heads(module: str, leaf: str, config: Mistral3Config) -> int:
    if module.startswith("vision_tower."):
        assert config.vision_config is not None, module
        return config.vision_config.num_attention_heads
    text = config.text_config
    return text.num_attention_heads if leaf == "q_proj" else text.num_key_value_heads
