"""Errors in OpenAI's shape, so the official clients raise their own typed exceptions
(openai.NotFoundError, openai.AuthenticationError, ...) with our message."""

from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 409: "invalid_request_error", 411: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 502: "server_error", 503: "server_error", 504: "server_error"}


class ApiError(Exception):
    """An answer that is not 2xx: the HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, as api.openai.com answers."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: {ident!r}", param, f"{what}_not_found")
