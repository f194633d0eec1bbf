"""Errors of the HTTP layer in the OpenAI error schema, and how they map to status codes.

Handlers raise `OpenAIError` subclasses; the app turns them into
`{"error": {"message", "type", "param", "code"}}` with the right status (and Retry-After for
overload). Engine `ValueError`s (bad parameters, over-long prompts) become 400s.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from ernie_cluster.serving.protocol import ErrorDetail, ErrorResponse


class OpenAIError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        detail = ErrorDetail(
            message=self.message, type=self.error_type, param=self.param, code=self.code
        )
        return ErrorResponse(error=detail).model_dump()


class BadRequestError(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(OpenAIError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"


class HeadersTooLargeError(OpenAIError):
    status_code = 431
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="headers_too_large", headers={"Connection": "close"})


class OverloadedError(OpenAIError):
    """The waiting queue is full: try again shortly."""

    status_code = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code="queue_full", headers={"Retry-After": str(retry_after_s)})


class EngineUnavailableError(OpenAIError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_unavailable", headers={"Retry-After": "5"})


def error_response(error: OpenAIError) -> JSONResponse:
    """The HTTP response of `error`: its OpenAI body, status and headers."""
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)
