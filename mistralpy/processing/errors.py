"""Errors a user's input caused while it was being processed; the server maps each to HTTP 400.

Every error names the request field at fault in `param` (e.g. "messages[0].content[1].image_url")
so the server can put it in the OpenAI error body's `param`.
"""

from __future__ import annotations

from mistralpy.errors import UserError


class InvalidInputError(UserError):
    """A request's content is unusable; `param` names the offending field (None if unknown)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class ImageError(InvalidInputError):
    """Base of every image-input problem (also raised for a source of no recognised kind)."""


class ImageFetchError(ImageError):
    """The image could not be fetched: unreachable host, HTTP error status, timeout, no such file,
    too many redirects."""


class ImageTooLargeError(ImageError):
    """The encoded bytes exceed the download cap, or the decoded size exceeds the pixel cap."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image of an accepted format (also malformed base64)."""


class ImageSourceForbiddenError(ImageError):
    """The source is refused by policy: a private/loopback/metadata address, a local path when
    local paths are off or outside the allowed directory, or a scheme other than http(s)/data."""


class TooManyImagesError(InvalidInputError):
    """A request carries more images than the policy's `max_images_per_request`."""
