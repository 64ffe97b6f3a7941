"""The API's endpoints: completions, chat completions, models, health, tokenize and detokenize.

`/v1/models` lists every registered model with its state (`device`, `host`, `loading`, `disk`) and
where it is; the admin routes that change the registry are in admin.py.

Every request is checked (model, parameters, prompt length) and submitted before its response
starts, so a bad request always gets a clean OpenAI-format error and never a broken stream.
Tokenizing and chat templating run in worker threads, so a long prompt holds up no other request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError

from aegaeon.config import ApiLimits
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.errors import SERVICE_UNAVAILABLE, ContextLengthExceeded, InvalidRequest
from aegaeon.serve.backend import Backend, ModelInfo, model_not_found
from aegaeon.serve.errors import error_body
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
    ModelLocation,
    ModelSettings,
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

    def __init__(self, backend: Backend, limits: ApiLimits):
        self.backend = backend
        self.limits = limits

    # models, health, tokenizer tools

    async def list_models(self) -> ModelList:
        return ModelList(data=[model_card(info) for info in await self.backend.models()])

    async def get_model(self, model_id: str) -> ModelCard:
        models = await self.backend.models()
        info = next((info for info in models if info.name == model_id), None)
        if info is None:
            raise model_not_found(model_id, (info.name for info in models))
        return model_card(info)

    async def health(self) -> JSONResponse:
        health = await self.backend.health()
        if not health.ok:
            body = {"status": "unavailable", **error_body(health.error or "unavailable", SERVICE_UNAVAILABLE)}
            return JSONResponse(body, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
        models = [info.name for info in await self.backend.models()]
        return JSONResponse({"status": "ok", "models": models, "live_requests": health.live_requests})

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        info = await self.backend.model(body.model)
        tokenizer = await self.backend.tokenizer(info.name)
        if body.messages is not None:
            messages = [message.for_template() for message in body.messages]
            tokens = await _apply_chat_template(tokenizer, messages, body.add_generation_prompt)
        else:
            prompt = body.prompt or ""
            tokens = await asyncio.to_thread(
                tokenizer.encode, prompt, add_special_tokens=body.add_special_tokens
            )
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=info.max_model_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        info = await self.backend.model(body.model)
        tokenizer = await self.backend.tokenizer(info.name)
        vocab = tokenizer.vocab_size
        for index, token in enumerate(body.tokens):
            if token >= vocab:
                raise InvalidRequest(
                    f"tokens[{index}]: token id {token} is outside the vocabulary of model {info.name!r} "
                    f"[0, {vocab})",
                    param=f"tokens[{index}]",
                )
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))

    # generation

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        info = await self.backend.model(body.model)
        params = self._params(body)
        tokenizer = await self.backend.tokenizer(info.name)
        prompt_ids = await _prompt_ids(tokenizer, body.prompt)
        live = await self._submit(
            info, tokenizer, prompt_ids, params, COMPLETION_ID_PREFIX, body.include_usage, "prompt"
        )
        with_logprobs = body.logprobs is not None
        if body.stream:
            return streaming_response(self._completion_chunks(live, with_logprobs))
        final = await collect(live, request)
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
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage()
        )
        return JSONResponse(response.model_dump())

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        info = await self.backend.model(body.model)
        params = self._params(body)
        tokenizer = await self.backend.tokenizer(info.name)
        prompt_ids = await _apply_chat_template(tokenizer, body.template_messages(), True)
        live = await self._submit(
            info, tokenizer, prompt_ids, params, CHAT_ID_PREFIX, body.include_usage, "messages"
        )
        if body.stream:
            return streaming_response(self._chat_chunks(live, body.logprobs))
        final = await collect(live, request)
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
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage()
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

    def _params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's SamplingParams within this server's limits on `n` and output tokens."""
        limits = self.limits
        if body.n > limits.max_n:
            raise InvalidRequest(
                f"n is {body.n}, over this server's limit of {limits.max_n} choices per request (max_n); "
                f"ask for at most {limits.max_n}",
                param="n",
            )
        params = body.sampling_params()  # InvalidRequest naming the field on a value out of range
        cap = limits.max_output_tokens
        if cap is None:
            return params
        length_field = body.length_field()
        requested = getattr(body, length_field) if length_field in body.model_fields_set else None
        if requested is not None and requested > cap:
            raise InvalidRequest(
                f"{length_field} is {requested}, over this server's limit of {cap} tokens per choice "
                f"(max_output_tokens); ask for at most {cap}",
                param=length_field,
            )
        # A length not given, or null ("until the context is full"): the server's limit applies.
        if params.max_tokens is not None and params.max_tokens <= cap:
            return params
        return replace(params, max_tokens=cap)

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
            raise InvalidRequest(f"the {param} is empty", param=param)
        most = self.limits.max_prompt_tokens
        if most is not None and len(prompt_ids) > most and most < info.max_model_len - 1:
            raise ContextLengthExceeded(
                f"the {param} has {len(prompt_ids)} tokens, over this server's limit of {most} prompt "
                f"tokens per request (max_prompt_tokens); shorten the {param}",
                param=param,
            )
        if len(prompt_ids) >= info.max_model_len:
            raise ContextLengthExceeded(
                f"the {param} has {len(prompt_ids)} tokens, but model {info.name!r} accepts at most "
                f"{info.max_model_len - 1} prompt tokens (its context, max_model_len, is "
                f"{info.max_model_len} tokens); shorten the {param}",
                param=param,
            )
        request_id = new_id(id_prefix)
        stream = await self.backend.generate(info.name, prompt_ids, params, request_id)
        return LiveRequest(
            request_id, info.name, now_s(), len(prompt_ids), params.n, include_usage, tokenizer, stream
        )


def model_card(info: ModelInfo) -> ModelCard:
    """A model as the API shows it, with where it is and its registry settings."""
    record = info.record
    settings = (
        ModelSettings(
            path=record.path,
            ttft_s=record.ttft_s,
            tbt_s=record.tbt_s,
            priority=record.priority,
            pinned=record.pinned,
        )
        if record is not None
        else None
    )
    return ModelCard(
        id=info.name,
        created=info.created,
        max_model_len=info.max_model_len,
        state=info.state,
        locations=[ModelLocation(**asdict(location)) for location in info.locations],
        settings=settings,
    )


async def _prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return await asyncio.to_thread(tokenizer.encode, prompt)
    return list(prompt)


async def _apply_chat_template(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> list[int]:
    try:
        return await asyncio.to_thread(
            tokenizer.apply_chat_template, messages, add_generation_prompt=add_generation_prompt
        )
    except (ValueError, TemplateError) as error:  # the tokenizer's word on messages it cannot render
        message = f"the messages do not fit the model's chat template: {error}"
        raise InvalidRequest(message, param="messages") from None
