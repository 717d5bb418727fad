"""OpenAI-shaped errors: every refusal is `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

A `FastSteerError` that reaches a handler is a 400 with its message; any other exception is a bug: a 500 whose
body says nothing of it but an error id, under which the traceback goes to the server log (`log_internal`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from steer.errors import FastSteerError

log = logging.getLogger("apps.serve")


class APIError(Exception):
    """A request the server refuses: HTTP status, a message that says what was wrong, and the parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> APIError:
        return cls(400, message, param)

    @classmethod
    def over_limit(
        cls,
        what: str,
        value: int | float,
        limit: int | float,
        flag: str,
        param: str | None,
        status: int = 400,
    ) -> APIError:
        """A request over one of the server's limits: names the value sent, the limit and the flag that sets it."""
        return cls(
            status,
            f"{what} is {value}; this server accepts at most {limit} ({flag})",
            param,
            code="limit_exceeded",
        )

    @classmethod
    def internal(cls, error_id: str) -> APIError:
        """A bug's 500: only the id the server logged its traceback under, never the exception's text."""
        return cls(
            500, f"internal error, id {error_id} (see the server log)", None, "server_error", "internal_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def log_internal(what: str, exc: BaseException) -> str:
    """Log `exc` with its traceback under a fresh error id, and return the id (what a client is told)."""
    error_id = uuid.uuid4().hex
    log.error("%s (error id %s)", what, error_id, exc_info=exc)
    return error_id


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic complaint about a request body as a 400 naming its parameter."""
    errors = exc.errors()
    if not errors:
        return APIError.bad_request("the request body is invalid")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    alternatives = [first]
    if loc and _is_union_member(loc[-1]):  # one error per member of a union: name the field, list them all
        alternatives = [e for e in errors if [str(p) for p in e["loc"] if p != "body"][:-1] == loc[:-1]]
        loc = loc[:-1]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError.bad_request(f"malformed JSON in the request body: {detail}")
    if kind == "extra_forbidden":
        return APIError.bad_request(f"unsupported parameter {param!r}", param)
    if kind == "missing":
        return APIError.bad_request(f"missing required parameter {param!r}", param)
    if kind == "model_attributes_type" and not loc:
        return APIError.bad_request("the request body must be a JSON object")
    others = len(errors) - len(alternatives)
    more = f" (and {others} more problem(s))" if others else ""
    said = ", or ".join(dict.fromkeys(e.get("msg", "invalid value") for e in alternatives))
    return APIError.bad_request(f"{param or 'body'}: {said}{more}", param)


def _is_union_member(part: str) -> bool:
    """Whether a location part is pydantic's tag of a union member (`str`, `list[TextPart]`), not a field."""
    return part.endswith("]") or part in ("str", "int", "float", "bool") or part[:1].isupper()


def install_error_handlers(app: FastAPI) -> None:
    """Route every refusal (ours, pydantic's, Starlette's 404/405, a `FastSteerError`) and every bug (a 500
    without its text) through the OpenAI error shape."""

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, kind
        ).response()

    async def on_fast_steer_error(request: Request, exc: FastSteerError) -> JSONResponse:
        return APIError.bad_request(str(exc)).response()

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette raises `exc` again once this is sent (uvicorn logs it too, without the id)
        return APIError.internal(log_internal(f"{request.method} {request.url.path} failed", exc)).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(FastSteerError, on_fast_steer_error)
    app.add_exception_handler(Exception, on_bug)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
