"""One error hierarchy, mapped to HTTP once.

Services raise these; ``exception_handlers`` turns them (and Litestar's own validation errors) into an OpenAI-style
error body on ``/v1`` routes and RFC 9457 problem details elsewhere. Handlers never format errors themselves.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException


class AppError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, detail: str, *, field: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail, self.field, self.extra = detail, field, extra or {}


class ClientError(AppError):
    status, code = 400, "invalid_request"


class Unauthorized(ClientError):
    status, code = 401, "unauthorized"


class Forbidden(ClientError):
    status, code = 403, "forbidden"


class NotFound(ClientError):
    status, code = 404, "not_found"


class Conflict(ClientError):
    status, code = 409, "conflict"


class RateLimited(ClientError):
    status, code = 429, "rate_limited"


class Unavailable(AppError):
    status, code = 503, "unavailable"


def _respond(request: Request, status: int, code: str, detail: str, field: str | None, extra: dict) -> Response:
    headers = {"Retry-After": str(extra["retry_after"])} if "retry_after" in extra else None
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": detail, "type": code, "param": field, "code": status, **extra}}
        return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)
    body = {**extra, "type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "code": code, **({"field": field} if field else {})}
    return Response(body, status_code=status, media_type="application/problem+json", headers=headers)


def _app_error(request: Request, exc: AppError) -> Response:
    return _respond(request, exc.status, exc.code, exc.detail, exc.field, exc.extra)


def _validation_error(request: Request, exc: ValidationException) -> Response:
    # Litestar lists the offending fields in ``extra``; name the first so a client knows what to fix.
    problems = [p for p in exc.extra if isinstance(p, dict)] if isinstance(exc.extra, list) else []
    first = problems[0] if problems else {}
    field, message = first.get("key"), first.get("message", exc.detail)
    named = re.search(r"(unknown|missing required) field `([^`]+)`", str(message))
    if named:  # name the offending field itself, not the object holding it ("data" is the whole body)
        field = named.group(2) if field in (None, "data") else f"{field}.{named.group(2)}"
        message = "is not a supported field" if named.group(1) == "unknown" else "is required"
    detail = f"{field}: {message}" if field else str(message)
    return _respond(request, 400, "invalid_request", detail, field, {"errors": problems} if problems else {})


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _respond(request, exc.status_code, HTTPStatus(exc.status_code).name.lower(), exc.detail, None, {})


exception_handlers = {
    AppError: _app_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
}
