"""The one base class of user mistakes.

`UserError` is what a caller did wrong: a bad parameter, prompt, image, schema, model path or
flag. The server answers it with HTTP 400 (or the 4xx its subclass names) and its message; the
CLI prints it without a traceback. Every other exception is ours: HTTP 500 with a generic
message, the details in the log. It subclasses `ValueError` so that Python callers who catch
`ValueError` keep working.
"""


class UserError(ValueError):
    """A mistake in what the caller asked for; its message is written for them."""
