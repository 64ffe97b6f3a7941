"""The API's endpoints: completions, chat completions, models, health, tokenize and detokenize.

Every request is checked (model, parameters, prompt length) and submitted before its response
starts, so a bad request always gets a clean OpenAI-format error and never a broken stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError

from aegaeon.config import ApiLimits
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.admission import Overloaded
from aegaeon.serve.backend import ClusterBackend, ModelInfo
from aegaeon.serve.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    RATE_LIMIT,
    RATE_LIMIT_EXCEEDED,
    SERVICE_UNAVAILABLE,
    STATUS_TOO_MANY_REQUESTS,
    APIError,
    bad_request,
    error_body,
    model_not_found,
)
from aegaeon.serve.logprobs import chat_logprobs, completion_logprobs
from aegaeon.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    Prompt,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    new_id,
    now_s,
)
from aegaeon.serve.streaming import Delta, LiveRequest, collect, sse_chunk, sse_stream, streaming_response

# nginx's status for "the client closed the request": logged only, nobody is left to read it.
CLIENT_CLOSED_REQUEST = 499
COMPLETION_ID_PREFIX = "cmpl"
CHAT_ID_PREFIX = "chatcmpl"


class Routes:
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
            return streaming_response(self._completion_chunks(live, with_logprobs))
        final = await collect(live.stream, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=completion_logprobs(tokenizer, choice.logprobs, 0) if with_logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for choice in final.outputs
        ]
        response = CompletionResponse(
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage(final)
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
            return streaming_response(self._chat_chunks(live, body.logprobs))
        final = await collect(live.stream, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            ChatChoice(
                index=choice.index,
                message=ChatResponseMessage(content=choice.text),
                logprobs=chat_logprobs(tokenizer, choice.logprobs) if body.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for choice in final.outputs
        ]
        response = ChatCompletionResponse(
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage(final)
        )
        return JSONResponse(response.model_dump())

    def _completion_chunks(self, live: LiveRequest, with_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            return sse_chunk(live, "text_completion", choices, usage)

        def render(delta: Delta) -> str:
            logprobs = (
                completion_logprobs(live.tokenizer, delta.logprobs, delta.text_offset).model_dump()
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

        return sse_stream(live, [], render, lambda usage: chunk([], usage), with_logprobs)

    def _chat_chunks(self, live: LiveRequest, with_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            return sse_chunk(live, "chat.completion.chunk", choices, usage)

        def choice(
            index: int, delta: dict[str, str], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        def render(delta: Delta) -> str:
            logprobs = (
                chat_logprobs(live.tokenizer, delta.logprobs).model_dump()
                if with_logprobs and delta.logprobs is not None
                else None
            )
            content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
            return chunk([choice(delta.index, content, logprobs, delta.finish_reason)])

        # OpenAI opens each choice with the assistant role and empty content.
        opening = [chunk([choice(index, {"role": "assistant", "content": ""})]) for index in range(live.n)]
        return sse_stream(live, opening, render, lambda usage: chunk([], usage), with_logprobs)

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
    ) -> LiveRequest:
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
        return LiveRequest(
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
