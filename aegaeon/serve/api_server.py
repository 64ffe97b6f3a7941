"""The OpenAI-compatible HTTP API: a FastAPI app over a `ClusterBackend`, and a uvicorn runner.

Every request is checked (model, parameters, prompt length) and submitted before its response
starts, so a bad request always gets a clean OpenAI-format error and never a broken stream.
Streams are built here from the node's outputs, each of which holds only what is new; a
non-streaming response adds them up.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aegaeon.config import ApiLimits
from aegaeon.engine.outputs import RequestDelta, RequestOutput
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.admission import Overloaded, Shed
from aegaeon.serve.backend import ClusterBackend, ModelInfo, RequestStream
from aegaeon.serve.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_API_KEY,
    INVALID_CONTENT_TYPE,
    INVALID_JSON,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    RATE_LIMIT,
    RATE_LIMIT_EXCEEDED,
    REQUEST_TOO_LARGE,
    SERVER_ERROR,
    SERVICE_UNAVAILABLE,
    STATUS_REQUEST_TOO_LARGE,
    STATUS_TOO_MANY_REQUESTS,
    APIError,
    bad_request,
    describe_validation_errors,
    error_body,
    model_not_found,
)
from aegaeon.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    Prompt,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
    new_id,
    now_s,
)
from aegaeon.serve.rate_limit import RateLimiter, retry_after_header

logger = logging.getLogger(__name__)

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = "data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to, which would hold a stream's tokens back.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# JSON has no -inf; vLLM reports a token the model rules out at this floor instead.
LOGPROB_FLOOR = -9999.0
# nginx's status for "the client closed the request": logged only, nobody is left to read it.
CLIENT_CLOSED_REQUEST = 499
COMPLETION_ID_PREFIX = "cmpl"
CHAT_ID_PREFIX = "chatcmpl"


def build_app(
    backend: ClusterBackend, api_keys: Sequence[str] = (), limits: ApiLimits | None = None
) -> FastAPI:
    """The API app; with `api_keys`, every /v1 route and /tokenize, /detokenize need `Bearer KEY`.

    `limits` (default `ApiLimits()`) bounds each request: body bytes, `n`, prompt and output tokens.
    """
    limits = ApiLimits() if limits is None else limits
    app = FastAPI(
        title="aegaeon",
        summary="OpenAI-compatible API over many models switched per token",
        version=_package_version(),
    )
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.router.route_class = _GuardedRoute
    serving = _Serving(backend, limits)
    auth = [Depends(_bearer_auth(api_keys))] if api_keys else []
    rate = (
        [Depends(_rate_limit(RateLimiter(limits.requests_per_minute)))] if limits.requests_per_minute else []
    )

    v1 = APIRouter(prefix="/v1", dependencies=auth, route_class=_GuardedRoute)
    v1.add_api_route(
        "/completions", serving.completions, methods=["POST"], response_model=None, dependencies=rate
    )
    v1.add_api_route(
        "/chat/completions",
        serving.chat_completions,
        methods=["POST"],
        response_model=None,
        dependencies=rate,
    )
    v1.add_api_route("/models", serving.list_models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", serving.get_model, methods=["GET"])
    tools = APIRouter(dependencies=auth, route_class=_GuardedRoute)
    tools.add_api_route("/tokenize", serving.tokenize, methods=["POST"])
    tools.add_api_route("/detokenize", serving.detokenize, methods=["POST"])
    app.include_router(v1)
    app.include_router(tools)
    app.add_api_route("/health", serving.health, methods=["GET"], response_model=None)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, running a callback once it has shut down.

    uvicorn re-raises SIGTERM/SIGINT after its shutdown, so code after `run()` would never run.
    """

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.on_shutdown is not None:
            self.on_shutdown()


def serve_http(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_shutdown: Callable[[], None] | None = None,
    drain_timeout_s: float | None = None,
) -> None:
    """Serve `app` with uvicorn until interrupted (blocks); `on_shutdown` runs once it has stopped.

    On SIGTERM, requests in flight get `drain_timeout_s` (None: as long as they need) to finish.
    """
    # log_config=None: uvicorn's loggers go through the handlers `aegaeon.logs.configure_logging` set.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        timeout_graceful_shutdown=drain_timeout_s,
    )
    _Server(config, on_shutdown).run()


def _package_version() -> str:
    try:
        return importlib.metadata.version("aegaeon")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


# -- errors and auth ---------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return exc.response(headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the OpenAI API (and its clients' error classes) use 400.
        errors = exc.errors()
        first = errors[0] if errors else {}
        if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes):
            # FastAPI parses JSON only when the Content-Type says so, and hands over the raw bytes otherwise.
            return _not_json(request).response()
        message, param, code = describe_validation_errors(errors)
        return bad_request(message, param, code).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        too_large = exc if isinstance(exc, _BodyTooLarge) else exc.__cause__
        if isinstance(too_large, _BodyTooLarge):  # itself, or wrapped by FastAPI's body reader
            return too_large.error.response()
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", NOT_FOUND
        elif exc.status_code == 405:
            message, code = f"{request.url.path} does not accept {request.method}", METHOD_NOT_ALLOWED
        elif exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body", raised from what json.loads failed on.
            return _unparsable_body(exc.__cause__).response()
        else:
            message, code = str(exc.detail), None
        return APIError(exc.status_code, message, code=code).response(getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A last resort (routes answer their own failures, see _GuardedRoute): Starlette re-raises
        # after this, and uvicorn then drops the connection.
        return _internal_error(request, exc)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _not_json(request: Request) -> APIError:
    content_type = request.headers.get("content-type")
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return bad_request(
        f"the request body must be a JSON object sent with 'Content-Type: application/json' (got {got})",
        None,
        INVALID_CONTENT_TYPE,
    )


def _unparsable_body(cause: BaseException) -> APIError:
    """A body json.loads could not read, for a reason other than its syntax (answered by FastAPI)."""
    if isinstance(cause, RecursionError):
        message = "the request body is nested too deeply to parse; send a flatter JSON object"
    elif isinstance(cause, UnicodeDecodeError):
        where = f"{cause.reason} at byte {cause.start}"
        message = f"the request body is not valid UTF-8 ({where}); send JSON encoded as UTF-8"
    else:
        message = f"the request body is not valid JSON: {cause}"
    return bad_request(message, None, INVALID_JSON)


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error; see the server log", SERVER_ERROR).response()


class _GuardedRoute(APIRoute):
    """A route that answers an unexpected exception with a 500 itself.

    Left to Starlette, the exception would reach uvicorn, which closes the connection: a client
    reusing it (keep-alive) would see its next request reset.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, StarletteHTTPException, RequestValidationError):
                raise  # answered by their handlers
            except Exception as exc:  # noqa: BLE001 - anything else is our bug: log it, answer 500
                return _internal_error(request, exc)

        return guarded


def _rate_limit(limiter: RateLimiter) -> Callable[[Request], Coroutine[Any, Any, None]]:
    async def within_rate(request: Request) -> None:
        # The key identifies the client where keys are required; otherwise its address does.
        client = request.headers.get("authorization") or (request.client.host if request.client else "")
        wait_s = limiter.take(client)
        if wait_s > 0:
            rpm = int(limiter.capacity)
            raise APIError(
                STATUS_TOO_MANY_REQUESTS,
                f"rate limit of {rpm} requests per minute reached; retry in {wait_s:.1f} s",
                RATE_LIMIT,
                code=RATE_LIMIT_EXCEEDED,
                headers={"Retry-After": retry_after_header(wait_s)},
            )

    return within_rate


def _bearer_auth(api_keys: Sequence[str]) -> Callable[[Request], Coroutine[Any, Any, None]]:
    expected = [f"Bearer {key}".encode() for key in api_keys]

    async def require_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        # Every key is compared, in constant time each: how long this takes says nothing of the keys.
        matches = [hmac.compare_digest(given, key) for key in expected]
        if not any(matches):
            raise APIError(
                401,
                "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                code=INVALID_API_KEY,
            )

    return require_key


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body grows past the limit; FastAPI's body reader re-raises it."""

    def __init__(self, error: APIError):
        super().__init__(error.status_code, error.message)
        self.error = error


def _body_too_large(max_bytes: int, declared: int | None = None) -> APIError:
    """The 413; `declared`: the body's Content-Length, if it had one."""
    size = f"{declared} bytes, " if declared is not None else ""
    return APIError(
        STATUS_REQUEST_TOO_LARGE,
        f"the request body is {size}over this server's limit of {max_bytes} bytes (max_body_bytes); "
        "send a smaller request",
        code=REQUEST_TOO_LARGE,
    )


class _BodyLimit:
    """ASGI middleware refusing a request body over `max_bytes` with a 413.

    A declared Content-Length over the limit is refused before anything is read; a body sent without
    one (chunked) is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = _body_too_large(self.max_bytes, declared).response()
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(_body_too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before the app runs
    return None


# -- stream bookkeeping ------------------------------------------------------------------------------


@dataclass
class _Cursor:
    """How much of one choice the client has been sent."""

    text_offset: int = 0  # completions logprobs: where the next token's text starts
    finished: bool = False


@dataclass
class _Delta:
    index: int
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    text_offset: int


@dataclass
class _Request:
    """A submitted request and what its responses need to say."""

    id: str
    model: str
    created: int
    prompt_tokens: int
    n: int
    include_usage: bool
    tokenizer: Tokenizer
    stream: RequestStream
    cursors: list[_Cursor] = field(default_factory=list)
    generated: int = 0  # output tokens so far, all choices

    def __post_init__(self) -> None:
        self.cursors = [_Cursor() for _ in range(self.n)]

    def deltas(self, output: RequestDelta, with_logprobs: bool) -> list[_Delta]:
        """What `output` adds to each choice not yet finished; choices with nothing new are left out."""
        deltas = []
        for choice in output.outputs:
            self.generated += len(choice.token_ids)
            cursor = self.cursors[choice.index]
            if cursor.finished:
                continue
            text, logprobs, finish = choice.text, choice.logprobs, choice.finish_reason
            if not text and finish is None and not (with_logprobs and choice.token_ids):
                continue
            deltas.append(_Delta(choice.index, text, logprobs, finish, cursor.text_offset))
            if logprobs:
                cursor.text_offset += sum(len(self.tokenizer.token_text(lp.token_id)) for lp in logprobs)
            cursor.finished = finish is not None
        return deltas

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.generated)


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprobs], text_offset: int
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for entry in logprobs:
        token = tokenizer.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_logprob(entry.logprob))
        result.top_logprobs.append({tokenizer.token_text(t): _logprob(lp) for t, lp in entry.top})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprobs]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        token = tokenizer.token_text(token_id)
        return TopLogprob(token=token, logprob=_logprob(logprob), bytes=list(token.encode("utf-8")))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(entry.token_id, entry.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in entry.top],
            )
            for entry in logprobs
        ]
    )


# JSON may carry these three raw, but a reader that splits lines the way str.splitlines does (httpx's
# iter_lines among them) would cut an event at one; generated text holds them now and then.
_ESCAPED_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event: a single `data:` line of JSON, whatever the text in it."""
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False).translate(_ESCAPED_LINE_BREAKS)
    return f"data: {data}\n\n"


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the routes --------------------------------------------------------------------------------------


class _Serving:
    """The route handlers; they talk to the backend only."""

    def __init__(self, backend: ClusterBackend, limits: ApiLimits):
        self.backend = backend
        self.limits = limits

    # models, health, tokenizer tools

    async def list_models(self) -> ModelList:
        return ModelList(data=[_card(info) for info in self.backend.models()])

    async def get_model(self, model_id: str) -> ModelCard:
        return _card(self._model(model_id))

    async def health(self) -> JSONResponse:
        health = self.backend.health()
        if not health.ok:
            body = {"status": "unavailable", **error_body(health.error or "unavailable", SERVICE_UNAVAILABLE)}
            return JSONResponse(body, status_code=503)
        models = [info.name for info in self.backend.models()]
        return JSONResponse({"status": "ok", "models": models, "live_requests": health.live_requests})

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        info = self._model(body.model)
        tokenizer = self._tokenizer(info)
        if body.messages is not None:
            messages = [message.for_template() for message in body.messages]
            tokens = self._apply_chat_template(tokenizer, messages, body.add_generation_prompt)
        else:
            tokens = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=info.max_model_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        info = self._model(body.model)
        tokenizer = self._tokenizer(info)
        vocab = tokenizer.vocab_size
        for index, token in enumerate(body.tokens):
            if token >= vocab:
                raise bad_request(
                    f"tokens[{index}]: token id {token} is outside the vocabulary of model {info.name!r} "
                    f"[0, {vocab})",
                    f"tokens[{index}]",
                )
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    # generation

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        info = self._model(body.model)
        params = self._params(body)
        tokenizer = self._tokenizer(info)
        prompt_ids = self._prompt_ids(tokenizer, body.prompt)
        live = await self._submit(
            info, tokenizer, prompt_ids, params, COMPLETION_ID_PREFIX, body.include_usage, "prompt"
        )
        with_logprobs = body.logprobs is not None
        if body.stream:
            return _streaming(self._completion_chunks(live, with_logprobs))
        final = await _collect(live, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=_completion_logprobs(tokenizer, choice.logprobs, 0) if with_logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for choice in final.outputs
        ]
        response = CompletionResponse(
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage()
        )
        return JSONResponse(response.model_dump())

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        info = self._model(body.model)
        params = self._params(body)
        tokenizer = self._tokenizer(info)
        prompt_ids = self._apply_chat_template(tokenizer, body.template_messages(), True)
        live = await self._submit(
            info, tokenizer, prompt_ids, params, CHAT_ID_PREFIX, body.include_usage, "messages"
        )
        if body.stream:
            return _streaming(self._chat_chunks(live, body.logprobs))
        final = await _collect(live, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            ChatChoice(
                index=choice.index,
                message=ChatResponseMessage(content=choice.text),
                logprobs=_chat_logprobs(tokenizer, choice.logprobs) if body.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for choice in final.outputs
        ]
        response = ChatCompletionResponse(
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage()
        )
        return JSONResponse(response.model_dump())

    def _completion_chunks(self, live: _Request, with_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            return _chunk(live, "text_completion", choices, usage)

        def render(delta: _Delta) -> str:
            logprobs = (
                _completion_logprobs(live.tokenizer, delta.logprobs, delta.text_offset).model_dump()
                if with_logprobs and delta.logprobs is not None
                else None
            )
            return chunk(
                [
                    {
                        "index": delta.index,
                        "text": delta.text,
                        "logprobs": logprobs,
                        "finish_reason": delta.finish_reason,
                    }
                ]
            )

        return _sse_stream(live, [], render, lambda usage: chunk([], usage), with_logprobs)

    def _chat_chunks(self, live: _Request, with_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            return _chunk(live, "chat.completion.chunk", choices, usage)

        def choice(
            index: int, delta: dict[str, str], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        def render(delta: _Delta) -> str:
            logprobs = (
                _chat_logprobs(live.tokenizer, delta.logprobs).model_dump()
                if with_logprobs and delta.logprobs is not None
                else None
            )
            content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
            return chunk([choice(delta.index, content, logprobs, delta.finish_reason)])

        # OpenAI opens each choice with the assistant role and empty content.
        opening = [chunk([choice(index, {"role": "assistant", "content": ""})]) for index in range(live.n)]
        return _sse_stream(live, opening, render, lambda usage: chunk([], usage), with_logprobs)

    # helpers

    def _model(self, name: str) -> ModelInfo:
        info = self.backend.model(name)
        if info is None:
            raise model_not_found(name, [m.name for m in self.backend.models()])
        return info

    def _tokenizer(self, info: ModelInfo) -> Tokenizer:
        try:
            return self.backend.tokenizer(info.name)
        except KeyError:  # its last node left since the model was looked up
            raise model_not_found(info.name, [m.name for m in self.backend.models()]) from None

    def _params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's SamplingParams within this server's limits on `n` and output tokens."""
        limits = self.limits
        if body.n > limits.max_n:
            raise bad_request(
                f"n is {body.n}, over this server's limit of {limits.max_n} choices per request (max_n); "
                f"ask for at most {limits.max_n}",
                "n",
            )
        params = _params(body)
        cap = limits.max_output_tokens
        if cap is None:
            return params
        length_field = body.length_field()
        requested = getattr(body, length_field) if length_field in body.model_fields_set else None
        if requested is not None and requested > cap:
            raise bad_request(
                f"{length_field} is {requested}, over this server's limit of {cap} tokens per choice "
                f"(max_output_tokens); ask for at most {cap}",
                length_field,
            )
        # A length not given, or null ("until the context is full"): the server's limit applies.
        if params.max_tokens is not None and params.max_tokens <= cap:
            return params
        return replace(params, max_tokens=cap)

    def _prompt_ids(self, tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer.encode(prompt)
        return list(prompt)

    def _apply_chat_template(
        self, tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> list[int]:
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except (ValueError, TemplateError) as error:
            message = f"the messages do not fit the model's chat template: {error}"
            raise bad_request(message, "messages") from None

    async def _submit(
        self,
        info: ModelInfo,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        id_prefix: str,
        include_usage: bool,
        param: str,
    ) -> _Request:
        """Check the prompt against the model and submit it; every failure here is a clean error."""
        if not prompt_ids:
            raise bad_request(f"the {param} is empty", param)
        most = self.limits.max_prompt_tokens
        if most is not None and len(prompt_ids) > most and most < info.max_model_len - 1:
            raise bad_request(
                f"the {param} has {len(prompt_ids)} tokens, over this server's limit of {most} prompt "
                f"tokens per request (max_prompt_tokens); shorten the {param}",
                param,
                CONTEXT_LENGTH_EXCEEDED,
            )
        if len(prompt_ids) >= info.max_model_len:
            raise bad_request(
                f"the {param} has {len(prompt_ids)} tokens, but model {info.name!r} accepts at most "
                f"{info.max_model_len - 1} prompt tokens (its context, max_model_len, is "
                f"{info.max_model_len} tokens); shorten the {param}",
                param,
                CONTEXT_LENGTH_EXCEEDED,
            )
        request_id = new_id(id_prefix)
        try:
            stream = await self.backend.generate(info.name, prompt_ids, params, request_id)
        except KeyError as error:
            raise model_not_found(info.name, [m.name for m in self.backend.models()]) from error
        except ValueError as error:
            raise bad_request(str(error), param) from None
        except Overloaded as error:
            raise APIError(
                STATUS_TOO_MANY_REQUESTS,
                str(error),
                RATE_LIMIT,
                code=RATE_LIMIT_EXCEEDED,
                headers={"Retry-After": str(error.retry_after_s)},
            ) from None
        except RuntimeError as error:
            raise APIError(503, str(error), SERVICE_UNAVAILABLE, code=SERVICE_UNAVAILABLE) from None
        return _Request(
            request_id, info.name, now_s(), len(prompt_ids), params.n, include_usage, tokenizer, stream
        )


def _card(info: ModelInfo) -> ModelCard:
    return ModelCard(id=info.name, created=info.created, max_model_len=info.max_model_len)


_SAMPLING_FIELDS = frozenset(f for f in SamplingParams.__dataclass_fields__)


def _params(body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """The request's SamplingParams; a value out of range is a 400 naming the field."""
    try:
        return body.sampling_params()
    except ValueError as error:
        message = str(error)
        name = message.split(" ", 1)[0]
        raise bad_request(message, name if name in _SAMPLING_FIELDS else None) from None


def _streaming(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def _chunk(live: _Request, kind: str, choices: list[dict[str, Any]], usage: Usage | None) -> str:
    usage_json = usage.model_dump() if usage else None
    return sse_event(
        {
            "id": live.id,
            "object": kind,
            "created": live.created,
            "model": live.model,
            "choices": choices,
            "usage": usage_json,
        }
    )


async def _sse_stream(
    live: _Request,
    opening: list[str],
    render: Callable[[_Delta], str],
    render_usage: Callable[[Usage], str],
    with_logprobs: bool,
) -> AsyncIterator[str]:
    """The SSE body: opening chunks, a chunk per choice delta, usage if asked for, then `[DONE]`.

    A failure after the response started becomes an in-band error event (as vLLM does). Closing
    the body early (the client went away: Starlette cancels it) aborts the request on the node.
    """
    try:
        for chunk in opening:
            yield chunk
        async for output in live.stream:
            for delta in live.deltas(output, with_logprobs):
                yield render(delta)
        if live.include_usage:
            yield render_usage(live.usage())
    except Exception as error:  # noqa: BLE001 - too late for an HTTP status: report it in the stream
        yield sse_event(_generation_error(error).body())
    finally:
        live.stream.close()
    yield SSE_DONE


async def _collect(live: _Request, request: Request) -> RequestOutput | None:
    """The request's whole output; None if the client disconnected first (the request is aborted)."""
    stream = live.stream

    async def last() -> RequestOutput:
        final = RequestOutput(live.id, None, [])
        async for output in stream:
            final.add(output)
            live.generated += sum(len(choice.token_ids) for choice in output.outputs)
        return final

    collecting = asyncio.ensure_future(last())
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            return None
        try:
            return collecting.result()
        except Exception as error:
            raise _generation_error(error) from None
    finally:
        watching.cancel()
        collecting.cancel()
        stream.close()


def _generation_error(error: BaseException) -> APIError:
    """An error the node reported for a running request, as the client should see it."""
    if isinstance(error, Shed):  # the node is overloaded: the request may succeed later
        return APIError(503, f"the request was shed: {error}", SERVICE_UNAVAILABLE, code=SERVICE_UNAVAILABLE)
    if isinstance(error, RuntimeError):
        # The node's own failures ("does not fit the KV memory ...") say what happened.
        return APIError(500, f"the request failed: {error}", SERVER_ERROR)
    logger.error("generation failed", exc_info=error)
    return APIError(500, "the request failed with an internal error; see the server log", SERVER_ERROR)
