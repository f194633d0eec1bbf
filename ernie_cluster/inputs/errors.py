"""InputError: a request the engine cannot run, naming the parameter at fault."""

from __future__ import annotations


class InputError(ValueError):
    """A bad request input. A ValueError, so Python callers need nothing new; the HTTP layer
    reads `param` and `code` into the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
