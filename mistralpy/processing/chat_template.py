"""Chat templates (Jinja2 sandbox, transformers semantics) and chat -> prompt token ids.

`build_chat_prompt` renders OpenAI-format messages with a `ChatTemplate`, then tokenizes so that
only control tokens written by the template become special ids: special-token strings inside
user-supplied strings ("[INST]" typed by a user) are escaped before rendering and end up as
plain-text tokens, as mistral-common encodes them. Each template [IMG] placeholder is expanded
to its image's [IMG]*cols + [IMG_BREAK] rows grid, the last row ending in [IMG_END].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import string
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistralpy.errors import UserError
from mistralpy.processing.tokenizer import Tokenizer

if TYPE_CHECKING:
    from mistralpy.processing.images import ProcessedImage

DEFAULT_TEMPLATE_NAME = "mistral_small_tool_call.jinja"
_ROLES = ("system", "user", "assistant", "tool")
_TEXT_PARTS = ("text", "input_text", "output_text")
_IMAGE_PARTS = ("image", "image_url", "input_image")
# Which role may follow which (mistral-common's validator).
_NEXT_ROLES = {
    "system": {"user", "assistant", "system"},
    "user": {"assistant", "system", "user"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_CHARS = string.ascii_letters + string.digits
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Escape for user strings: a noncharacter inserted after every "[" and "<" so that no special
# token string can start inside user text; an existing one is doubled. Undone after rendering.
_ESC = "\ufdd0"
_ESCAPE = re.compile(r"([\[<\ufdd0])")
_UNESCAPE = re.compile("\ufdd0(\ufdd0?)")


class ChatTemplateError(UserError):
    """The chat template is missing, does not compile, or raised while rendering."""


class InvalidChatError(UserError):
    """The messages (roles, order, content, tool calls) are not a valid chat."""


def packaged_template_path(name: str = DEFAULT_TEMPLATE_NAME) -> Path:
    """Path of a .jinja template shipped in mistralpy/chat_templates/."""
    return Path(__file__).resolve().parent.parent / "chat_templates" / name


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Plain str (jinja2's own tojson returns HTML-escaped Markup); json.dumps defaults as
    # mistral-common serialises tools and calls.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment():
    """A Jinja environment with transformers' sandbox settings and helpers."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile(source: str):
    """Compile a template in transformers' sandbox settings."""
    from jinja2 import TemplateError

    try:
        return _environment().from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def _reads_tools(source: str) -> bool:
    from jinja2 import meta

    return "tools" in meta.find_undeclared_variables(_environment().parse(source))


@dataclass
class ChatTemplate:
    """One compiled chat template (or a set of named ones, as tokenizer_config allows)."""

    templates: dict[str, str]  # name -> Jinja source; "default" when unnamed
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    _compiled: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.templates:
            raise ChatTemplateError("no chat template given")
        self._compiled = {name: _compile(src) for name, src in self.templates.items()}

    @classmethod
    def from_string(
        cls, source: str, bos_token: str = "<s>", eos_token: str = "</s>"
    ) -> ChatTemplate:
        return cls({"default": source}, bos_token, eos_token)

    @classmethod
    def default(cls) -> ChatTemplate:
        """The packaged Mistral Small 3.1 template (tool calling, images)."""
        return cls.from_string(packaged_template_path().read_text(encoding="utf-8"))

    @classmethod
    def from_dir(cls, path: str | Path, jinja_explicit: str | Path | None = None) -> ChatTemplate:
        """Template of a checkpoint dir, by priority: jinja_explicit file, chat_template.jinja,
        chat_template.json, tokenizer_config.json's chat_template; else the packaged default."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path, jinja_explicit)
        bos, eos = _special_strings(path / "tokenizer_config.json")
        if jinja_explicit is not None:
            return cls({"default": _read_explicit(jinja_explicit)}, bos, eos)
        found = _templates_in_dir(path)
        if found is None:
            return cls({"default": packaged_template_path().read_text(encoding="utf-8")}, bos, eos)
        return cls(found, bos, eos)

    def reads_tools(self) -> bool:
        """Whether some template reads `tools` (the HF repo's Mistral Small 3.1 one does not:
        it drops tools silently and fails on an assistant turn with tool_calls and no content)."""
        return any(_reads_tools(source) for source in self.templates.values())

    def with_tool_template(self) -> ChatTemplate:
        """This template for plain chats, the bundled Mistral tool template ("tool_use") for
        chats with tools, tool calls or tool results."""
        tool_use = packaged_template_path().read_text(encoding="utf-8")
        return ChatTemplate(
            {**self.templates, "tool_use": tool_use}, self.bos_token, self.eos_token
        )

    @classmethod
    def from_gguf(cls, file: str | Path, jinja_explicit: str | Path | None = None) -> ChatTemplate:
        """The GGUF model's `tokenizer.chat_template` (or the jinja_explicit file), with its
        BOS/EOS token strings; a file without a template gets the packaged default."""
        from mistralpy.model.gguf_file import open_gguf

        meta = open_gguf(file).metadata
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token(key: str, default: str) -> str:
            index = meta.get(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else default

        bos = token("tokenizer.ggml.bos_token_id", "<s>")
        eos = token("tokenizer.ggml.eos_token_id", "</s>")
        if jinja_explicit is not None:
            return cls({"default": _read_explicit(jinja_explicit)}, bos, eos)
        source = meta.get("tokenizer.chat_template")
        if not isinstance(source, str):
            source = packaged_template_path().read_text(encoding="utf-8")
        return cls({"default": source}, bos, eos)

    def _select(self, name: str | None, has_tools: bool):
        if name is not None:
            if name not in self._compiled:
                raise ChatTemplateError(
                    f"no chat template named {name!r}: {sorted(self._compiled)}"
                )
            return self._compiled[name]
        if has_tools and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        if len(self._compiled) == 1:
            return next(iter(self._compiled.values()))
        raise ChatTemplateError(
            f"several chat templates and none named 'default': {sorted(self._compiled)}"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_name: str | None = None,
        **template_vars: Any,
    ) -> str:
        """Render to text. template_vars are extra template variables (chat_template_kwargs)."""
        template = self._select(template_name, bool(tools) or _has_tool_turns(messages))
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **template_vars}
        try:
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as e:  # anything a template does wrong is the template's error
            raise ChatTemplateError(f"chat template error: {e}") from e


def _has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        isinstance(m, Mapping) and (m.get("tool_calls") or m.get("role") == "tool")
        for m in messages
    )


def needs_tool_template(template: ChatTemplate, tokenizer: Tokenizer) -> bool:
    """True when the tokenizer has Mistral's tool control tokens (Tekken v7) but the template
    never reads `tools`: such chats are then rendered with the bundled tool template."""
    controls = ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]")
    has_controls = all(c in tokenizer.special_tokens for c in controls)
    return has_controls and not template.reads_tools()


def _read_explicit(jinja_explicit: str | Path) -> str:
    explicit = Path(jinja_explicit)
    if not explicit.is_file():
        raise ChatTemplateError(f"jinja_explicit: no such file {explicit}")
    return explicit.read_text(encoding="utf-8")


def _special_strings(config_file: Path) -> tuple[str, str]:
    """bos/eos token strings from tokenizer_config.json (plain or {"content": ...})."""
    if not config_file.is_file():
        return "<s>", "</s>"
    config = json.loads(config_file.read_text(encoding="utf-8"))

    def content(key: str, default: str) -> str:
        value = config.get(key) or default
        return value["content"] if isinstance(value, dict) else str(value)

    return content("bos_token", "<s>"), content("eos_token", "</s>")


def _templates_in_dir(path: Path) -> dict[str, str] | None:
    """Named template sources found in a checkpoint dir, or None."""
    if (path / "chat_template.jinja").is_file():
        return {"default": (path / "chat_template.jinja").read_text(encoding="utf-8")}
    for file in (path / "chat_template.json", path / "tokenizer_config.json"):
        if not file.is_file():
            continue
        value = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list):
            return {t["name"]: t["template"] for t in value}
    return None


# ---------------------------------------------------------------------------------------------
# Validation (mistral-common's rules for tokenizer v7)


def validate_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    continue_final: bool,
) -> None:
    """Raise InvalidChatError unless messages form a chat mistral-common would encode."""
    if not messages:
        raise InvalidChatError("messages: a chat needs at least one message")
    for i, message in enumerate(messages):
        _validate_message(i, message)
    roles = [m["role"] for m in messages]
    if len(roles) == 1 and roles[0] not in ("user", "system"):
        raise InvalidChatError("messages: a single message must be a user or system message")
    for prev, cur in zip(roles, roles[1:]):
        if cur not in _NEXT_ROLES[prev]:
            raise InvalidChatError(f"messages: role {cur!r} cannot follow role {prev!r}")
    if len(roles) > 1 and roles[-1] == "assistant" and not continue_final:
        raise InvalidChatError(
            "messages: the last message is from the assistant; continue it with "
            "add_generation_prompt=False or end the chat with a user or tool message"
        )
    _validate_tool_call_counts(messages)
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidChatError("tools: each tool needs a function with a name")
        _check_function_name("tools", function["name"])


def _validate_message(i: int, message: Mapping[str, Any]) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidChatError(f"{where}: a message must be an object")
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidChatError(f"{where}.role: must be one of {list(_ROLES)}, got {role!r}")
    content = message.get("content")
    kinds = _content_kinds(where, content)
    if "image" in kinds and role != "user":
        raise InvalidChatError(f"{where}.content: only user messages can contain images")
    if role == "system" and content is None:
        raise InvalidChatError(f"{where}.content: a system message needs content")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
            raise InvalidChatError(
                f"{where}.tool_call_id: must be 9 characters a-z, A-Z, 0-9, got {call_id!r}"
            )
    if role == "assistant":
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise InvalidChatError(f"{where}.tool_calls: must be a list")
        for j, call in enumerate(calls):
            _validate_tool_call(f"{where}.tool_calls[{j}]", call)
        if not calls and not _has_text(content) and not message.get("prefix"):
            raise InvalidChatError(f"{where}: an assistant message needs content or tool_calls")


def _content_kinds(where: str, content: Any) -> set[str]:
    """{"text", "image"} present in a content value; raises on a bad shape or part type."""
    if content is None or isinstance(content, str):
        return {"text"}
    if not isinstance(content, list):
        raise InvalidChatError(f"{where}.content: must be a string or a list of parts")
    kinds = set()
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            kinds.add("text")
        elif kind in _IMAGE_PARTS:
            _image_source(f"{where}.content[{j}]", part)
            kinds.add("image")
        else:
            raise InvalidChatError(
                f"{where}.content[{j}]: unsupported part {kind!r} (text, image_url, image, input_image)"
            )
    return kinds


def _has_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content)
    return isinstance(content, list) and any(p.get("text") for p in content)


def _validate_tool_call(where: str, call: Any) -> None:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidChatError(f"{where}: a tool call needs function.name")
    _check_function_name(where, function["name"])
    call_id = call.get("id")
    if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
        raise InvalidChatError(f"{where}.id: must be 9 characters a-z, A-Z, 0-9, got {call_id!r}")


def _check_function_name(where: str, name: str) -> None:
    if not _FUNCTION_NAME.fullmatch(name):
        raise InvalidChatError(f"{where}: function name {name!r} must match [a-zA-Z0-9_-]{{1,64}}")


def _validate_tool_call_counts(messages: Sequence[Mapping[str, Any]]) -> None:
    """Each assistant's tool calls are answered by as many tool messages before the next one."""
    expected = 0
    for message in messages[1:]:
        if message["role"] == "tool":
            expected -= 1
        elif message["role"] == "assistant":
            if expected != 0:
                raise InvalidChatError("messages: tool calls and tool results do not match up")
            expected = len(message.get("tool_calls") or [])
    if expected != 0:
        raise InvalidChatError("messages: tool calls and tool results do not match up")


def image_sources(messages: Any) -> list[str]:
    """The sources of the image parts of `messages`, in order; parts of a bad shape are
    skipped here (`validate_chat` reports them)."""
    sources = []
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, Mapping) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, Mapping) and part.get("type") in _IMAGE_PARTS:
                with contextlib.suppress(InvalidChatError):
                    sources.append(_image_source(f"messages[{i}].content[{j}]", part))
    return sources


def _image_source(where: str, part: Mapping[str, Any]) -> str:
    """The URL / path / data URI of an image part, in any of the accepted spellings."""
    for key in ("image_url", "url", "image", "path"):
        value = part.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
    raise InvalidChatError(f"{where}: image part without a url (image_url.url, url, image)")


def openai_chat_to_mistral(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> ones mistral-common's rules accept, for chats from any client.

    "developer" (newer OpenAI SDKs) is a system message. Tool-call ids that are not Mistral's
    9 alphanumerics (OpenAI's `call_...`) are mapped to 9 characters by a hash of the id, so a
    call and the tool result naming it stay paired and the same chat renders the same ids
    (prefix caching). Tool-call arguments given as text must be JSON (llama.cpp's rule): the
    model would otherwise learn to emit broken calls from its own history.
    """
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            out.append(message)
            continue
        m = dict(message)
        if m.get("role") == "developer":
            m["role"] = "system"
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [
                _openai_call(f"messages[{i}].tool_calls[{j}]", c)
                for j, c in enumerate(m["tool_calls"])
            ]
        out.append(m)
    return out


def mistral_call_id(call_id: str) -> str:
    """`call_id` itself if it is 9 alphanumerics, else 9 alphanumerics derived from its hash."""
    if _CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_CHARS))
        chars.append(_ID_CHARS[digit])
    return "".join(chars)


def _openai_call(where: str, call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    if isinstance(call.get("id"), str):
        call["id"] = mistral_call_id(call["id"])
    arguments = (call.get("function") or {}).get("arguments")
    if isinstance(arguments, str) and arguments.strip():
        try:
            json.loads(arguments)
        except json.JSONDecodeError as e:
            raise InvalidChatError(
                f"{where}.function.arguments: not valid JSON ({e.msg} at {e.pos})"
            ) from None
    return call


# ---------------------------------------------------------------------------------------------
# Prompt building


@dataclass
class ProcessedPrompt:
    """A tokenized chat prompt, ready for the engine."""

    token_ids: list[int]  # [IMG]/[IMG_BREAK]/[IMG_END] already expanded
    images: list[ProcessedImage]  # in order of appearance (one per [IMG] grid)


def _arguments_json(where: str, arguments: Any) -> str:
    """OpenAI tool-call arguments -> the JSON text mistral-common writes for them: valid JSON
    is re-serialised, any other string becomes a JSON string, None / "" become {}."""
    if arguments is None or arguments == "":
        return "{}"
    if isinstance(arguments, str):
        # not JSON: stays a string and is serialised as one, as mistral-common does
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    try:
        return json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidChatError(f"{where}.function.arguments: not JSON-serialisable: {e}") from e


def _prepare_message(i: int, message: Mapping[str, Any], continue_final: bool) -> dict[str, Any]:
    """Copy of a message with tool-call arguments as final JSON text (the template emits a
    string argument verbatim) and "prefix" set on a continued final assistant message."""
    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                **call,
                "function": {
                    **call["function"],
                    "arguments": _arguments_json(
                        f"messages[{i}].tool_calls[{j}]", call["function"].get("arguments")
                    ),
                },
            }
            for j, call in enumerate(message["tool_calls"])
        ]
    if continue_final:
        out["prefix"] = True
    return out


def _escape(value: Any) -> Any:
    """Escape every string (and key) in a JSON-like value; see _ESC."""
    if isinstance(value, str):
        return _ESCAPE.sub(r"\1" + _ESC, value)
    if isinstance(value, Mapping):
        return {_escape(k): _escape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v) for v in value]
    return value


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(r"\1", text)


def tokenize_rendered(
    tokenizer: Tokenizer, rendered: str, stop: threading.Event | None = None
) -> list[int]:
    """Rendered template text (user strings escaped) -> ids: control tokens only from the
    template. `stop` set ends a long tokenization early (EncodingStopped)."""
    ids: list[int] = []
    for piece in tokenizer.split_special(rendered):
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids.extend(tokenizer.encode(_unescape(piece), stop=stop))
    return ids


def expand_images(
    tokenizer: Tokenizer, ids: list[int], images: Sequence[ProcessedImage]
) -> list[int]:
    """Replace the k-th [IMG] id by image k's grid: rows of [IMG]*cols + [IMG_BREAK], the
    last break being [IMG_END]."""
    img, brk, end = (
        tokenizer.image_token_id,
        tokenizer.image_break_token_id,
        tokenizer.image_end_token_id,
    )
    slots = [i for i, t in enumerate(ids) if t == img]
    if len(slots) != len(images):
        raise ChatTemplateError(
            f"chat template emitted {len(slots)} [IMG] placeholders for {len(images)} images"
        )
    if not images:
        return ids
    if img is None or brk is None or end is None:
        raise ChatTemplateError("the tokenizer has [IMG] but no [IMG_BREAK] / [IMG_END] token")
    out: list[int] = []
    start = 0
    for slot, image in zip(slots, images):
        out += ids[start:slot] + image.placeholder_token_ids(img, brk, end)
        start = slot + 1
    return out + ids[start:]


def build_chat_prompt(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    image_loader: Callable[[str], ProcessedImage] | None = None,
    add_generation_prompt: bool = True,
    template_vars: Mapping[str, Any] | None = None,
    stop: threading.Event | None = None,
) -> ProcessedPrompt:
    """OpenAI-format chat -> prompt ids (as mistral-common v7 encodes them) and loaded images.

    A last assistant message is continued (no </s>) when add_generation_prompt is False or it
    has "prefix": true; otherwise the chat must end with a user or tool message.
    """
    last = messages[-1] if messages else None
    continue_final = (
        isinstance(last, Mapping)
        and last.get("role") == "assistant"
        and (not add_generation_prompt or bool(last.get("prefix")))
    )
    validate_chat(messages, tools, continue_final)
    sources = image_sources(messages)
    if sources and image_loader is None:
        raise InvalidChatError("messages: images given but this model takes no images")
    prepared = [
        _prepare_message(i, m, continue_final and i == len(messages) - 1)
        for i, m in enumerate(messages)
    ]
    rendered = template.render(
        _escape(prepared),
        tools=_escape(list(tools)) if tools else None,
        add_generation_prompt=add_generation_prompt,
        **dict(template_vars or {}),
    )
    ids = tokenize_rendered(tokenizer, rendered, stop)
    images = [image_loader(src) for src in sources] if image_loader is not None else []
    return ProcessedPrompt(token_ids=expand_images(tokenizer, ids, images), images=images)
