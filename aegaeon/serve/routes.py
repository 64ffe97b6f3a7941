"""The API's endpoints: completions, chat completions, models, health, tokenize and detokenize.

`/v1/models` lists every registered model with its state (`device`, `host`, `loading`, `disk`) and
where it is; the admin routes that change the registry are in admin.py.

Every request is checked (model, parameters, prompt length) and submitted before its response
starts, so a bad request always gets a clean OpenAI-format error and never a broken stream.
Tokenizing and chat templating run in worker threads, so a long prompt holds up no other request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, replace
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError

from aegaeon.config import DEFAULT_KEY_WEIGHT, ApiLimits
from aegaeon.engine.grammar import check_grammar
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.errors import SERVICE_UNAVAILABLE, ContextLengthExceeded, InvalidRequest
from aegaeon.serve.backend import Backend, ModelInfo, model_not_found
from aegaeon.serve.errors import error_body
from aegaeon.serve.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    joined,
    prompt_logprobs_by_token,
)
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
    FunctionCall,
    ModelCard,
    ModelList,
    ModelLocation,
    ModelSettings,
    Prompt,
    PromptLogprob,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    Usage,
    new_id,
    now_s,
)
from aegaeon.serve.streaming import (
    Delta,
    LiveRequest,
    collect,
    sse_chunk,
    sse_stream,
    streaming_response,
    total_usage,
)
from aegaeon.serve.tools import ParsedCall, ToolCallParser, ToolCallStream, parser_for

# nginx's status for "the client closed the request": logged only, nobody is left to read it.
CLIENT_CLOSED_REQUEST = 499
COMPLETION_ID_PREFIX = "cmpl"
CHAT_ID_PREFIX = "chatcmpl"


class Routes:
    """The route handlers; they talk to the backend only."""

    def __init__(self, backend: Backend, limits: ApiLimits, key_weights: Mapping[str, float] | None = None):
        self.backend = backend
        self.limits = limits
        # Each API key's share of a model's waiting queue, by key id.
        self.key_weights = dict(key_weights or {})

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
        body.check_supported()
        info = await self.backend.model(body.model)
        self._check_n(body)
        total = body.n * len(body.prompts)
        if total > self.limits.max_n:
            raise InvalidRequest(
                f"{len(body.prompts)} prompts of n={body.n} choices each make {total} choices, over this "
                f"server's limit of {self.limits.max_n} per request (max_n); send fewer prompts",
                param="prompt",
            )
        params = await self._limited(body, body.sampling_params())
        tokenizer = await self.backend.tokenizer(info.name)
        prompts = [await _prompt_ids(tokenizer, prompt) for prompt in body.prompts]
        # One request per prompt; choices are numbered prompt-major (prompt p's j-th is p * n + j).
        lives: list[LiveRequest] = []
        try:
            for prompt_ids in prompts:
                live = await self._submit(
                    info,
                    tokenizer,
                    prompt_ids,
                    params,
                    COMPLETION_ID_PREFIX,
                    body.include_usage,
                    "prompt",
                    _key_id(request),
                )
                live.drop_output = body.max_tokens == 0
                lives.append(live)
        except BaseException:
            for live in lives:
                live.stream.close()
            raise
        echoes = [
            _prompt_text(tokenizer, prompt, ids) if body.echo else ""
            for prompt, ids in zip(body.prompts, prompts, strict=True)
        ]
        if body.stream:
            return streaming_response(self._completion_chunks(body, lives, prompts, echoes))
        finals = []
        for position, live in enumerate(lives):
            final = await collect(live, request)
            if final is None:
                for rest in lives[position + 1 :]:
                    rest.stream.close()
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            finals.append(final)
        choices = []
        for position, final in enumerate(finals):
            for choice in final.outputs:
                text, generated = choice.text, choice.logprobs
                finish = choice.finish_reason
                if lives[position].drop_output:
                    text, generated, finish = "", [], "length"
                logprobs = None
                if body.logprobs is not None:
                    echo_offset = len(echoes[position])
                    logprobs = completion_logprobs(tokenizer, generated or [], echo_offset)
                    if body.echo:
                        prompt_lps = final.prompt_logprobs or []
                        logprobs = joined(
                            echo_logprobs(tokenizer, prompts[position], prompt_lps, body.logprobs), logprobs
                        )
                choices.append(
                    CompletionChoice(
                        index=position * body.n + choice.index,
                        text=echoes[position] + text,
                        logprobs=logprobs,
                        finish_reason=finish,
                        prompt_logprobs=self._vllm_prompt_logprobs(body, tokenizer, final.prompt_logprobs),
                    )
                )
        response = CompletionResponse(
            id=lives[0].id,
            created=lives[0].created,
            model=lives[0].model,
            choices=choices,
            usage=total_usage(lives),
        )
        return JSONResponse(response.model_dump(exclude_none=False))

    @staticmethod
    def _vllm_prompt_logprobs(
        body: CompletionRequest, tokenizer: Tokenizer, prompt_logprobs: list[TokenLogprobs | None] | None
    ) -> list[dict[str, PromptLogprob] | None] | None:
        if body.prompt_logprobs is None or prompt_logprobs is None:
            return None
        return prompt_logprobs_by_token(tokenizer, prompt_logprobs, body.prompt_logprobs)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        info = await self.backend.model(body.model)
        self._check_n(body)
        tokenizer = await self.backend.tokenizer(info.name)
        parser = parser_for(tokenizer) if body.uses_tools else None
        forced = body.forced_tools
        tool_grammar = None
        if parser is not None and forced:
            tool_grammar = parser.grammar(forced, body.parallel_tool_calls and body.tool_choice == "required")
        params = await self._limited(body, body.sampling_params(tool_grammar))
        prompt_ids = await _apply_chat_template(
            tokenizer, body.template_messages(), True, body.template_tools()
        )
        live = await self._submit(
            info,
            tokenizer,
            prompt_ids,
            params,
            CHAT_ID_PREFIX,
            body.include_usage,
            "messages",
            _key_id(request),
        )
        if body.stream:
            return streaming_response(self._chat_chunks(live, body.logprobs, parser, body.continuous_usage))
        final = await collect(live, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = []
        for choice in final.outputs:
            message, finish = ChatResponseMessage(content=choice.text), choice.finish_reason
            if parser is not None:
                parsed = parser.parse(choice.text)
                if parsed.calls:
                    message = ChatResponseMessage(
                        content=parsed.content, tool_calls=_tool_calls(parsed.calls)
                    )
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(
                ChatChoice(
                    index=choice.index,
                    message=message,
                    logprobs=chat_logprobs(tokenizer, choice.logprobs) if body.logprobs else None,
                    finish_reason=finish,
                )
            )
        response = ChatCompletionResponse(
            id=live.id, created=live.created, model=live.model, choices=choices, usage=live.usage()
        )
        return JSONResponse(response.model_dump())

    def _completion_chunks(
        self, body: CompletionRequest, lives: list[LiveRequest], prompts: list[list[int]], echoes: list[str]
    ) -> AsyncIterator[str]:
        live = lives[0]
        tokenizer = live.tokenizer
        with_logprobs = body.logprobs is not None

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            if usage is None and body.continuous_usage:
                usage = total_usage(lives)
            return sse_chunk(live, "text_completion", choices, usage)

        def render(position: int, delta: Delta) -> list[str]:
            echo = echoes[position] if delta.first else ""
            logprobs = None
            if with_logprobs:
                generated = delta.logprobs or []
                logprobs = completion_logprobs(
                    tokenizer, generated, len(echoes[position]) + delta.text_offset
                )
                if body.echo and delta.first:
                    prompt_lps = delta.prompt_logprobs or []
                    logprobs = joined(
                        echo_logprobs(tokenizer, prompts[position], prompt_lps, body.logprobs or 0), logprobs
                    )
                logprobs = logprobs.model_dump()
            entry = {
                "index": position * body.n + delta.index,
                "text": echo + delta.text,
                "logprobs": logprobs,
                "finish_reason": delta.finish_reason,
            }
            if delta.first and body.prompt_logprobs is not None:
                prompt_lps = self._vllm_prompt_logprobs(body, tokenizer, delta.prompt_logprobs)
                entry["prompt_logprobs"] = [
                    p if p is None else {k: v.model_dump() for k, v in p.items()} for p in prompt_lps or []
                ]
            return [chunk([entry])]

        return sse_stream(lives, [], render, lambda usage: chunk([], usage), with_logprobs or body.echo)

    def _chat_chunks(
        self, live: LiveRequest, with_logprobs: bool, parser: ToolCallParser | None, continuous_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            if usage is None and continuous_usage:
                usage = live.usage()
            return sse_chunk(live, "chat.completion.chunk", choices, usage)

        def choice(
            index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        streams = [ToolCallStream(parser) for _ in range(live.n)] if parser is not None else None

        def render(_: int, delta: Delta) -> list[str]:
            logprobs = (
                chat_logprobs(live.tokenizer, delta.logprobs).model_dump()
                if with_logprobs and delta.logprobs is not None
                else None
            )
            if streams is None:
                content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
                return [chunk([choice(delta.index, content, logprobs, delta.finish_reason)])]
            # Tool calls: text before them streams as content; each call goes out once complete, as
            # OpenAI sends one: its id and name first, then its arguments.
            stream = streams[delta.index]
            text, calls = stream.feed(delta.text, final=delta.finish_reason is not None)
            chunks = []
            if text or logprobs is not None:
                chunks.append(chunk([choice(delta.index, {"content": text}, logprobs)]))
            first = len(stream.calls) - len(calls)
            for number, call in enumerate(calls, start=first):
                opening = {
                    "index": number,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                chunks.append(chunk([choice(delta.index, {"tool_calls": [opening]})]))
                arguments = {"index": number, "function": {"arguments": call.arguments}}
                chunks.append(chunk([choice(delta.index, {"tool_calls": [arguments]})]))
            if delta.finish_reason is not None:
                finish = (
                    "tool_calls" if stream.calls and delta.finish_reason == "stop" else delta.finish_reason
                )
                chunks.append(chunk([choice(delta.index, {}, None, finish)]))
            return chunks

        # OpenAI opens each choice with the assistant role and empty content.
        opening = [chunk([choice(index, {"role": "assistant", "content": ""})]) for index in range(live.n)]
        return sse_stream([live], opening, render, lambda usage: chunk([], usage), with_logprobs)

    # helpers

    def _check_n(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        limits = self.limits
        if body.n > limits.max_n:
            raise InvalidRequest(
                f"n is {body.n}, over this server's limit of {limits.max_n} choices per request (max_n); "
                f"ask for at most {limits.max_n}",
                param="n",
            )

    async def _limited(
        self, body: CompletionRequest | ChatCompletionRequest, params: SamplingParams
    ) -> SamplingParams:
        """The request's SamplingParams within this server's limit on output tokens, its grammar checked."""
        if params.grammar is not None:  # a 400 naming the problem, before anything is submitted
            await asyncio.to_thread(check_grammar, params.grammar)
        limits = self.limits
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
        key: str | None = None,
    ) -> LiveRequest:
        """Check the prompt against the model and submit it; every failure here is a clean error.

        `key`: the id of the API key it came with (None: the server needs none).
        """
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
        weight = self.key_weights.get(key, DEFAULT_KEY_WEIGHT) if key else DEFAULT_KEY_WEIGHT
        stream = await self.backend.generate(
            info.name, prompt_ids, params, request_id, key=key, key_weight=weight
        )
        return LiveRequest(
            request_id, info.name, now_s(), len(prompt_ids), params.n, include_usage, tokenizer, stream
        )


def _key_id(request: Request) -> str | None:
    """The id of the API key the request was authenticated with (None: no keys are configured)."""
    return getattr(request.state, "api_key_id", None)


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


def _prompt_text(tokenizer: Tokenizer, prompt: Prompt, prompt_ids: list[int]) -> str:
    """The prompt as echoed: its text, or its tokens decoded when it was sent as token ids."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids, skip_special_tokens=False)


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [
        ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in calls
    ]


async def _apply_chat_template(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    try:
        return await asyncio.to_thread(
            tokenizer.apply_chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
    except (ValueError, TemplateError) as error:  # the tokenizer's word on messages it cannot render
        message = f"the messages do not fit the model's chat template: {error}"
        raise InvalidRequest(message, param="messages") from None
