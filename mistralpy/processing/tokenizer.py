"""Tekken tokenizer: encode/decode with a `tokenizers` backend (tokenizer.json) or mistral-common
(tekken.json), plus an incremental detokenizer that is exact across split UTF-8 characters.
GGUF models bring their byte-level BPE vocabulary in metadata (GPT-2 style, or Tekken written as
BPE); `Tokenizer.from_gguf` builds the same `tokenizers` BPE from it.

Decoding is done here, byte-exact, from one id -> bytes table for both backends, so the streamed
deltas of `IncrementalDetokenizer` always add up to `Tokenizer.decode` of the same ids.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistralpy.errors import UserError
from mistralpy.model.gguf_file import GGUFVocab

if TYPE_CHECKING:
    import tokenizers

# A bracketed run with no inner brackets: every special token ("<s>", "[INST]", "<SPECIAL_42>")
# has this shape, so candidates are found by one cheap regex and checked against a dict,
# instead of a 1000-way alternation.
_SPECIAL_CANDIDATE = re.compile(r"[<\[][^<>\[\]]*[>\]]")


# Text longer than this is encoded in pieces when a stop flag is given, so that the work ends
# within one piece (~10 ms of a core) of the flag being set (the client left).
ENCODE_PIECE_CHARS = 1 << 15


class EncodingStopped(Exception):
    """Encoding was stopped by its flag: nobody waits for the ids any more."""


def word_end_pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut at a letter followed by a
    space. Every pre-tokenizer we load (Tekken's, llama 3's and GPT-2's regex, digit splits)
    ends a token there: no alternative matches a letter and then a space, none looks behind,
    and the token after starts with that space. So encoding the pieces one by one gives the
    ids of encoding the whole text (tests/unit/test_tokenizer.py checks it with hypothesis)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not text[cut - 1].isalpha():
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class TokenizerError(UserError):
    """The tokenizer files are missing or not a supported (byte-level BPE / Tekken) tokenizer."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte 0..255 -> one printable unicode char.

    Printable latin-1 bytes map to themselves; the others are shifted to 256+ so that no token
    string contains whitespace or control characters (what `tokenizers`' ByteLevel expects).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of `byte_to_unicode`."""
    return {c: b for b, c in byte_to_unicode().items()}


def tekken_special_tokens(tekken: dict[str, Any]) -> list[str]:
    """Special-token strings of a parsed tekken.json, ordered by id (length = num special)."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    entries = tekken.get("special_tokens")
    if entries is None:  # v7 files may omit the list: mistral-common's defaults apply
        entries = list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
    named = [
        str(getattr(e["token_str"], "value", e["token_str"]))
        for e in sorted(entries, key=lambda e: e["rank"])
    ]
    count = tekken["config"]["default_num_special_tokens"]
    filler = [Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(named), count)]
    return named + filler


def tekken_to_hf_tokenizer(tekken: dict[str, Any]) -> tokenizers.Tokenizer:
    """Build a `tokenizers.Tokenizer` (byte-level BPE) that encodes exactly like the Tekkenizer.

    Tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a whole
    pre-token directly when it is in the vocabulary; the equivalent HF BPE has merge (a, b)
    ranked by rank(a + b) and `ignore_merges=True`. Ids are shifted by the special-token count.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    specials = tekken_special_tokens(tekken)
    inner = tekken["config"]["default_vocab_size"] - len(specials)
    ranks = {base64.b64decode(e["token_bytes"]): i for i, e in enumerate(tekken["vocab"][:inner])}
    alphabet = byte_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges: list[tuple[int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    vocab = {as_str(t): r + len(specials) for t, r in ranks.items()}
    vocab.update({s: i for i, s in enumerate(specials)})
    model = BPE(vocab, [(as_str(a), as_str(b)) for _, _, a, b in merges], fuse_unk=False)
    model.ignore_merges = True
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tekken["config"]["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _split_regex(hf) -> str | None:
    """Regex of the first Split pre-tokenizer of a `tokenizers.Tokenizer`, if any."""
    if hf.pre_tokenizer is None:
        return None
    pre = json.loads(hf.pre_tokenizer.__getstate__())
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            return step.get("pattern", {}).get("Regex")
    return None


def _with_split_pattern(tokenizer_json: str, pattern: str) -> str:
    """tokenizer.json text with the regex of its (first) Split pre-tokenizer set to pattern."""
    data = json.loads(tokenizer_json)
    pre = data["pre_tokenizer"]
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            step["pattern"] = {"Regex": pattern}
            break
    return json.dumps(data, ensure_ascii=False)


# GGUF `tokenizer.ggml.pre` -> the regex llama.cpp splits text with before BPE (None: GPT-2's
# own, applied by ByteLevel). "smollm" first isolates every digit, as SmolLM2's tokenizer.json
# (Digits(individual_digits)) and llama.cpp do.
_GPT2_SPLIT = None
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS: dict[str, str | None] = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "smollm": _GPT2_SPLIT,  # plus individual digits, see gguf_bpe_tokenizer
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}


_IGNORE_MERGES = ("tekken", "llama-bpe", "llama3")


def gguf_bpe_tokenizer(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE) from GGUF tokenizer metadata: the vocabulary
    and merges as stored; token_type 3 (control) special, 4 (user-defined) added, matched
    whole in text as llama.cpp does."""
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 BPE only)")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} unknown; known: {sorted(GGUF_PRE_TOKENIZERS)}"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    model = BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
    # tiktoken-style vocabularies take a whole pre-token found in the vocabulary as one token
    # (Tekken, llama 3), as their tokenizer.json files (and llama.cpp) do
    model.ignore_merges = pre in _IGNORE_MERGES
    tok = HFTokenizer(model)
    split = GGUF_PRE_TOKENIZERS[pre]
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    ]
    if split is not None:
        steps.insert(0, pre_tokenizers.Split(Regex(split), behavior="isolated"))
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )
    return tok


def gguf_vocabulary(model_dir: str | Path, chat_template: str | None) -> GGUFVocab:
    """The Tekken vocabulary of a checkpoint directory (tekken.json, or a tokenizer.json
    converted from one) as llama.cpp's converter writes Mistral's: gpt2 BPE with pre "tekken",
    byte-level tokens by id, control type for special tokens, merges in rank order; BOS/EOS and
    add_bos as this checkpoint's Tokenizer has them, so both files tokenize alike."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(model_dir)
    hf = None
    if (path / "tokenizer.json").is_file():
        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        if _split_regex(hf) != _TEKKEN_SPLIT:  # another vocabulary, or a wrong Tekken regex
            hf = None
    if hf is None and (path / "tekken.json").is_file():
        tekken = json.loads((path / "tekken.json").read_text("utf-8"))
        if tekken["config"]["pattern"] == _TEKKEN_SPLIT:
            hf = tekken_to_hf_tokenizer(tekken)
    if hf is None:
        raise TokenizerError(f"{path}: GGUF export supports Tekken vocabularies only")
    data = json.loads(hf.to_str())
    added = {t["content"]: (t["id"], t["special"]) for t in data["added_tokens"]}
    vocab = {**data["model"]["vocab"], **{s: i for s, (i, _) in added.items()}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if len(tokens) != max(vocab.values()) + 1:
        raise TokenizerError(f"{path}: the vocabulary's ids are not contiguous")
    types = [(3 if added[t][1] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    ours = Tokenizer.from_dir(path)
    return GGUFVocab(
        "tekken", tokens, types, merges, ours.bos_token_id, ours.eos_token_id, ours.add_bos,
        chat_template,
    )  # fmt: skip


class Tokenizer:
    """Text <-> ids for a byte-level BPE vocabulary: Tekken (Mistral Small 3.1: 131072 ids,
    1000 special) or a GGUF model's.

    `encode` treats its text as plain text by default: "[INST]" typed by a user becomes ordinary
    tokens, as mistral-common does. Only `parse_special=True` maps special-token strings to ids.
    """

    def __init__(
        self,
        encode_plain,
        token_bytes: list[bytes],
        specials: dict[str, int],
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos: bool = True,
    ):
        # encode_plain: str -> list[int] without special-token parsing; bos/eos ids: None
        # means Mistral's "<s>" / "</s>"; add_bos: encode(add_special_tokens=True) prepends BOS
        self._encode_plain = encode_plain
        self._token_bytes = token_bytes  # id -> bytes of a regular token (b"" for specials)
        self.special_tokens: dict[str, int] = dict(specials)  # special string -> id
        self._special_strings = {i: s for s, i in specials.items()}
        self.special_token_ids: frozenset[int] = frozenset(self._special_strings)
        # No token spans more bytes than this: a text of N characters has at least
        # N / max_token_bytes tokens, a bound checked before tokenizing a huge text.
        self.max_token_bytes = max((len(b) for b in token_bytes), default=1) or 1
        self._regular_ids = {
            b: i for i, b in enumerate(token_bytes) if i not in self._special_strings
        }
        self.bos_token_id = self._required("<s>") if bos_token_id is None else bos_token_id
        self.eos_token_id = self._required("</s>") if eos_token_id is None else eos_token_id
        self.add_bos = add_bos
        self.unk_token_id = specials.get("<unk>")
        self.pad_token_id = specials.get("<pad>")
        self.image_token_id = specials.get("[IMG]")
        self.image_break_token_id = specials.get("[IMG_BREAK]")
        self.image_end_token_id = specials.get("[IMG_END]")
        # whether word_end_pieces may cut text for encoding: not when a normalizer or an added
        # token could span a cut (set by the constructors that know)
        self.cuts_at_word_ends = True

    def _required(self, token: str) -> int:
        if token not in self.special_tokens:
            raise TokenizerError(f"tokenizer has no special token {token!r}")
        return self.special_tokens[token]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory (tokenizer.json if present, else tekken.json) or
        from a GGUF model file's metadata."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        if (path / "tokenizer.json").is_file():
            pattern = None
            if (path / "tekken.json").is_file():
                pattern = json.loads((path / "tekken.json").read_text("utf-8"))["config"]["pattern"]
            return cls.from_tokenizer_json(
                path / "tokenizer.json", pattern, path / "tokenizer_config.json"
            )
        if (path / "tekken.json").is_file():
            return cls.from_tekken(path / "tekken.json")
        raise TokenizerError(f"no tokenizer.json or tekken.json in {path}")

    @classmethod
    def from_gguf(cls, file: str | Path) -> Tokenizer:
        """The vocabulary in a GGUF model's metadata (BOS/EOS ids and add_bos as stated)."""
        from mistralpy.model.gguf_file import open_gguf

        meta = open_gguf(file).metadata
        if "tokenizer.ggml.tokens" not in meta:
            raise TokenizerError(f"{file}: GGUF file without a tokenizer")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if bos is None or eos is None:
            raise TokenizerError(f"{file}: GGUF tokenizer states no BOS or EOS token id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        hf = gguf_bpe_tokenizer(meta)
        return cls._from_hf(hf, str(file), lambda specials: (int(bos), int(eos)), add_bos)

    @classmethod
    def from_tokenizer_json(
        cls, file: str | Path, split_pattern: str | None = None, config_file: Path | None = None
    ) -> Tokenizer:
        """Fast path: a byte-level BPE tokenizer.json (as converted from Tekken, or a llama one).

        split_pattern: Tekken's pre-tokenizer regex; when given it replaces the file's Split
        regex (some hub tokenizer.json files of Mistral Small 3.1 carry a wrong one).
        config_file: a tokenizer_config.json whose bos/eos tokens apply (a llama vocabulary
        has no "<s>"); Mistral's "<s>" / "</s>" otherwise.
        """
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(file))
            if split_pattern is not None and _split_regex(hf) not in (None, split_pattern):
                text = _with_split_pattern(Path(file).read_text(encoding="utf-8"), split_pattern)
                hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise TokenizerError(f"cannot read {file}: {e}") from e
        return cls._from_hf(hf, str(file), lambda specials: _config_specials(config_file, specials))

    @classmethod
    def _from_hf(
        cls,
        hf: tokenizers.Tokenizer,
        source: str,
        bos_eos: Callable[[dict[str, int]], tuple[int | None, int | None]],
        add_bos: bool = True,
    ) -> Tokenizer:
        """A Tokenizer over a `tokenizers.Tokenizer` read from `source`; bos_eos: the
        (BOS, EOS) ids given its special tokens (string -> id)."""
        hf.encode_special_tokens = True  # special strings in text are plain text
        specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        table = _byte_table(hf, specials, source)
        bos, eos = bos_eos(specials)
        encode = lambda text: hf.encode(text, add_special_tokens=False).ids  # noqa: E731
        tokenizer = cls(encode, table, specials, bos, eos, add_bos)
        tokenizer.cuts_at_word_ends = _cuts_at_word_ends(hf)
        return tokenizer

    @classmethod
    def from_tekken(cls, file: str | Path) -> Tokenizer:
        """Native Mistral layout: tekken.json through mistral-common's Tekkenizer."""
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        tek = Tekkenizer.from_file(str(file))
        specials = {tek.id_to_piece(i): i for i in range(tek.num_special_tokens)}
        table = [
            b"" if i in tek.special_ids else tek.id_to_byte_piece(i) for i in range(tek.n_words)
        ]
        return cls(lambda text: tek.encode(text, bos=False, eos=False), table, specials)

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode(
        self,
        text: str,
        add_special_tokens: bool = False,
        parse_special: bool = False,
        stop: threading.Event | None = None,
    ) -> list[int]:
        """Text -> ids. add_special_tokens prepends BOS where the vocabulary adds one (add_bos);
        parse_special maps "[INST]" etc. to ids; `stop` set (from another thread) ends a long
        encoding early with EncodingStopped."""
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        if not parse_special:
            return ids + self._encode_stoppable(text, stop)
        for piece in self.split_special(text):
            ids.extend([piece] if isinstance(piece, int) else self._encode_stoppable(piece, stop))
        return ids

    def _encode_stoppable(self, text: str, stop: threading.Event | None) -> list[int]:
        if stop is None or len(text) <= ENCODE_PIECE_CHARS or not self.cuts_at_word_ends:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece in word_end_pieces(text, ENCODE_PIECE_CHARS):
            if stop.is_set():
                raise EncodingStopped()
            ids += self._encode_plain(piece)
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """Split text at special-token strings: plain-text pieces (str) and special ids (int)."""
        out: list[str | int] = []
        start = 0
        for m in _SPECIAL_CANDIDATE.finditer(text):
            token_id = self.special_tokens.get(m.group())
            if token_id is None:
                continue
            if m.start() > start:
                out.append(text[start : m.start()])
            out.append(token_id)
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        return out

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Raw bytes of one token (a special token: b"" if skipped, else its UTF-8 string)."""
        if token_id in self._special_strings:
            return b"" if skip_special_tokens else self._special_strings[token_id].encode()
        if not 0 <= token_id < len(self._token_bytes):
            raise TokenizerError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text; invalid or incomplete UTF-8 becomes U+FFFD (maximal-subpart rule)."""
        raw = b"".join(self.token_bytes(int(i), skip_special_tokens) for i in ids)
        return raw.decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a special-token string or of a regular token's exact text; None if neither."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._regular_ids.get(token.encode())

    def id_to_token(self, token_id: int) -> str:
        """Special-token string, or the token's text (U+FFFD where it is a partial character)."""
        return self.token_bytes(token_id, skip_special_tokens=False).decode("utf-8", "replace")


def _cuts_at_word_ends(hf) -> bool:
    """Whether encoding a `tokenizers.Tokenizer`'s text in word_end_pieces keeps its ids: no
    normalizer, and no plain added token (matched whole in text) that holds a space."""
    added = hf.get_added_tokens_decoder().values()
    return hf.normalizer is None and not any(" " in t.content for t in added if not t.special)


def _config_specials(
    config_file: Path | None, specials: dict[str, int]
) -> tuple[int | None, int | None]:
    """(bos id, eos id) stated by a tokenizer_config.json; None where not stated. (Its
    add_bos_token is not read: Mistral's says false because the template writes BOS, while a
    text prompt to /v1/completions gets BOS as mistral-common encodes it.)"""
    if config_file is None or not config_file.is_file():
        return None, None
    config = json.loads(config_file.read_text(encoding="utf-8"))

    def special(key: str) -> int | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return specials.get(value) if isinstance(value, str) else None

    return special("bos_token"), special("eos_token")


def _byte_table(hf, specials: dict[str, int], source: str) -> list[bytes]:
    """id -> bytes of every regular token of a byte-level BPE `tokenizers.Tokenizer`
    (b"" for special ids); raises TokenizerError for a vocabulary that is not byte-level."""
    pieces = hf.get_vocab(with_added_tokens=False)  # byte-level string -> id
    stray = set().union(*pieces) - set(unicode_to_byte())
    if stray:
        raise TokenizerError(
            f"{source}: not a byte-level BPE vocabulary (chars {sorted(stray)[:5]})"
        )
    as_latin1 = str.maketrans({c: chr(b) for c, b in unicode_to_byte().items()})
    table = [b""] * hf.get_vocab_size(with_added_tokens=True)
    special_ids = set(specials.values())
    for piece, i in pieces.items():
        if i not in special_ids:
            table[i] = piece.translate(as_latin1).encode("latin-1")
    return table


class IncrementalDetokenizer:
    """Streams text for generated ids: `step(new_ids)` returns the new complete text.

    Bytes of a character split over several tokens are held back until the character is
    complete, so no U+FFFD is emitted for a sequence that is merely unfinished. The deltas of
    all `step` calls plus `flush()` equal `tokenizer.decode(all_output_ids)`.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        # prompt_ids: unused by byte-level BPE (no leading-space context); kept for the contract
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.output_ids: list[int] = []
        self.text = ""  # all text emitted so far

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete (may be "")."""
        new_ids = [int(i) for i in new_token_ids]
        self.output_ids.extend(new_ids)
        raw = b"".join(self._tokenizer.token_bytes(i, self._skip_special) for i in new_ids)
        delta = self._decoder.decode(raw)
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of stream: return U+FFFD for a trailing incomplete character, if any."""
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta
