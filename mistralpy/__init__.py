"""mistralpy: an inference engine and OpenAI-compatible server for Mistral Small 3.1.

The mistral.rs-shaped API is exported lazily, so `import mistralpy` stays cheap (no torch):
    from mistralpy import Runner, Which, ChatCompletionRequest, VisionArchitecture
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Runner": "mistralpy.api.runner",
    "VisionModelBuilder": "mistralpy.api.runner",
    "MultimodalModelBuilder": "mistralpy.api.runner",
    "TextModelBuilder": "mistralpy.api.runner",
    "Model": "mistralpy.api.runner",
    "Which": "mistralpy.api.types",
    "ChatCompletionRequest": "mistralpy.api.types",
    "CompletionRequest": "mistralpy.api.types",
    "VisionArchitecture": "mistralpy.api.types",
    "MultimodalArchitecture": "mistralpy.api.types",
    "Architecture": "mistralpy.api.types",
    "IsqType": "mistralpy.api.types",
    "ModelDType": "mistralpy.api.types",
    "TextMessages": "mistralpy.api.types",
    "VisionMessages": "mistralpy.api.types",
    "TextMessageRole": "mistralpy.api.types",
    "ToolChoice": "mistralpy.api.types",
    "SamplingParams": "mistralpy.params",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mistralpy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
