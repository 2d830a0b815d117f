"""Typed errors raised by the engine.

User mistakes subclass `mistralpy.errors.UserError` (the server maps them to HTTP 400); failures of the engine
itself subclass `RuntimeError`.
"""

from __future__ import annotations

from mistralpy.errors import UserError


class PromptTooLongError(UserError):
    """The prompt leaves no room for even one generated token within `max_model_len`."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int):
        super().__init__(
            f"prompt has {num_prompt_tokens} tokens, but the model context holds at most "
            f"{max_model_len} tokens including at least one generated token; "
            f"shorten the prompt to at most {max_model_len - 1} tokens"
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class EmptyPromptError(UserError):
    """A request arrived with no prompt tokens at all."""

    def __init__(self) -> None:
        super().__init__("prompt must contain at least one token")


class DuplicateRequestError(UserError):
    """`request_id` is already in use by an unfinished request."""

    def __init__(self, request_id: str):
        super().__init__(f"request_id {request_id!r} is already in use")
        self.request_id = request_id


class ImageTokenMismatchError(UserError):
    """The number of image tokens in the prompt differs from what its images need."""

    def __init__(self, num_image_tokens: int, expected: int):
        super().__init__(
            f"prompt has {num_image_tokens} image tokens but its images need {expected} "
            f"(rows * cols summed over images)"
        )


class EngineDeadError(RuntimeError):
    """The engine was shut down, or its background loop stopped; no request can proceed."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; other requests were not affected."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id!r} failed: {message}")
        self.request_id = request_id


class ReaderTooSlowError(RuntimeError):
    """The request's reader fell too far behind its outputs (a client that stopped reading);
    the request was aborted so that it holds no engine slot for nobody."""

    def __init__(self, max_unread: int):
        super().__init__(
            f"the client did not read its stream ({max_unread} outputs behind); request aborted"
        )
