"""GGUF files (llama.cpp's single-file models): locate them and read them with the `gguf` package.

A leaf module, like model.config: it knows file names and the GGUF container, nothing of our
modules. The checkpoint loader reads tensors through `open_gguf`, model.config the architecture
and shapes, processing the vocabulary and chat template; all of them share one parsed header.

Sharded files (llama.cpp's `gguf-split`) are named `<name>-00001-of-0000N.gguf`; the first shard
holds every metadata key, each shard some of the tensors.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralpy.errors import UserError

GGUF_SUFFIX = ".gguf"
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(UserError):
    """The GGUF file is missing, malformed, incomplete, or describes an unsupported model."""


def find_gguf(directory: Path) -> Path | None:
    """The one GGUF model in `directory` (first shard if split), None if it holds none.

    Raises GGUFError when several models lie there (the caller must name the file) and skips
    llama.cpp `mmproj` files, which hold a vision encoder, not a model to serve.
    """
    found = [
        p
        for p in sorted(directory.glob(f"*{GGUF_SUFFIX}"))
        if "mmproj" not in p.name.lower() and _shard_number(p) in (None, 1)
    ]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GGUFError(f"{directory} holds several GGUF models ({names}); name one file")
    return found[0] if found else None


def gguf_shard_names(first_name: str) -> list[str]:
    """File names of every shard of the model whose first file is named `first_name`."""
    m = _SHARD.match(first_name)
    if m is None:
        return [first_name]
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def gguf_shards(first: Path) -> list[Path]:
    """All shard files of the model whose (first) file is `first`, in order."""
    files = [first.with_name(n) for n in gguf_shard_names(first.name)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"GGUF shards missing next to {first.name}: {missing}")
    return files


def _shard_number(path: Path) -> int | None:
    m = _SHARD.match(path.name)
    return int(m["no"]) if m else None


def first_shard(path: Path) -> Path:
    """Shard 1 of a split model given any of its shards (the path itself otherwise)."""
    m = _SHARD.match(path.name)
    if m is None or int(m["no"]) == 1:
        return path
    return path.with_name(f"{m['stem']}-00001-of-{m['count']}.gguf")


@dataclass(frozen=True)
class GGUFTensor:
    """One stored tensor, its bytes still in the memory-mapped file."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # logical shape, outermost first: (out, in) for a matrix
    data: Any  # numpy view of the file: (rows, bytes per row) uint8 for block types


@dataclass(frozen=True)
class GGUFModelFile:
    """A parsed GGUF model (all shards): metadata of shard 1 and every tensor."""

    path: Path  # the first shard
    metadata: dict[str, Any]  # key -> plain Python value; tokenizer arrays included
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


@dataclass(frozen=True)
class GGUFVocab:
    """A tokenizer as llama.cpp writes it into a GGUF model (`tokenizer.*` keys); built by
    processing.tokenizer.gguf_vocabulary, written by checkpoint.gguf_writer."""

    pre: str  # tokenizer.ggml.pre, the pre-tokenizer's name: "tekken" for Mistral's
    tokens: list[str]  # id -> byte-level BPE string (a special token: its text)
    token_types: list[int]  # id -> gguf.TokenType: 1 normal, 3 control (special), 4 user-defined
    merges: list[str]  # "left right" pieces, in rank order
    bos_token_id: int
    eos_token_id: int
    add_bos: bool  # tokenizer.ggml.add_bos_token: a plain text prompt starts with BOS
    chat_template: str | None  # tokenizer.chat_template (Jinja)


def open_gguf(path: str | Path) -> GGUFModelFile:
    """Parse the GGUF model at `path` (any shard), sharing the parse with later callers.

    The gguf package parses a header field by field in Python (~4 s for a 49k-token
    vocabulary), and one load reads config, tokenizer, template and tensors: the parse is
    memoised per file identity (path, size, mtime), so an edited file is parsed again.
    """
    first = first_shard(Path(path).resolve())
    if not first.is_file():
        raise GGUFError(f"no such GGUF file: {first}")
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in gguf_shards(first)]
    return _open_cached(tuple(stats))


@functools.lru_cache(maxsize=2)
def _open_cached(shards: tuple[tuple[str, int, int], ...]) -> GGUFModelFile:
    from gguf import GGUFReader

    metadata: dict[str, Any] = {}
    tensors: dict[str, GGUFTensor] = {}
    for i, (file, _, _) in enumerate(shards):
        try:
            reader = GGUFReader(file)
        except (ValueError, OSError) as e:  # the package raises ValueError on bad magic etc.
            raise GGUFError(f"cannot read GGUF file {file}: {e}") from e
        if i == 0:
            metadata = {k: f.contents() for k, f in reader.fields.items()}
        for t in reader.tensors:
            # reader.shape is GGML's innermost-first order; ours is PyTorch's
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = GGUFTensor(t.name, int(t.tensor_type), shape, t.data)
    return GGUFModelFile(Path(shards[0][0]), metadata, tensors)
