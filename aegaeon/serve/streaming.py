"""A submitted request's responses: what each choice has sent so far, SSE bodies, and the final output.

The node's outputs hold only what is new: a stream sends each as it comes, a non-streaming
response adds them up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from aegaeon.engine.outputs import RequestDelta, RequestOutput
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.errors import AegaeonError
from aegaeon.serve.backend import RequestStream
from aegaeon.serve.error_handlers import internal_error
from aegaeon.serve.errors import body_of
from aegaeon.serve.protocol import Usage

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = "data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to, which would hold a stream's tokens back.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Cursor:
    """How much of one choice the client has been sent."""

    text_offset: int = 0  # completions logprobs: where the next token's text starts
    finished: bool = False
    started: bool = False  # something of it was sent


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    text_offset: int
    first: bool  # the first delta of its choice the client is sent
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class LiveRequest:
    """A submitted request and what its responses need to say."""

    id: str
    model: str
    created: int
    prompt_tokens: int
    n: int
    include_usage: bool
    tokenizer: Tokenizer
    stream: RequestStream
    # Output the client did not ask for (max_tokens 0: the prefill scored the prompt and sampled one
    # token): its text and tokens are dropped, not counted.
    drop_output: bool = False
    cursors: list[_Cursor] = field(default_factory=list)
    generated: int = 0  # output tokens so far, all choices

    def __post_init__(self) -> None:
        self.cursors = [_Cursor() for _ in range(self.n)]

    def deltas(self, output: RequestDelta, with_logprobs: bool) -> list[Delta]:
        """What `output` adds to each choice not yet finished; choices with nothing new are left out."""
        deltas = []
        for choice in output.outputs:
            self.count(choice.token_ids)
            cursor = self.cursors[choice.index]
            if cursor.finished:
                continue
            text, logprobs, finish = choice.text, choice.logprobs, choice.finish_reason
            if self.drop_output:
                text, logprobs, finish = "", None, "length" if finish is not None else None
            if (
                not text
                and finish is None
                and not (with_logprobs and logprobs)
                and not choice.prompt_logprobs
            ):
                continue
            deltas.append(
                Delta(
                    choice.index,
                    text,
                    logprobs,
                    finish,
                    cursor.text_offset,
                    not cursor.started,
                    choice.prompt_logprobs,
                )
            )
            cursor.started = True
            if logprobs:
                cursor.text_offset += sum(len(self.tokenizer.token_text(lp.token_id)) for lp in logprobs)
            cursor.finished = finish is not None
        return deltas

    def count(self, token_ids: list[int]) -> None:
        """Count generated tokens toward usage (unless the output is dropped)."""
        if not self.drop_output:
            self.generated += len(token_ids)

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.generated)


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


def streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def sse_chunk(live: LiveRequest, kind: str, choices: list[dict[str, Any]], usage: Usage | None) -> str:
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


def total_usage(lives: list[LiveRequest]) -> Usage:
    """The usage of one response's requests (several prompts: one request each)."""
    return Usage.of(sum(live.prompt_tokens for live in lives), sum(live.generated for live in lives))


async def _outputs(lives: list[LiveRequest]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """The outputs of several requests as they come, each with its request's position in `lives`."""
    if len(lives) == 1:
        async for output in lives[0].stream:
            yield 0, output
        return
    arrivals: asyncio.Queue[tuple[int, RequestDelta | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, live: LiveRequest) -> None:
        try:
            async for output in live.stream:
                await arrivals.put((position, output))
            await arrivals.put((position, None))
        except Exception as error:  # noqa: BLE001 - raised by the reader below
            await arrivals.put((position, error))

    pumps = [asyncio.ensure_future(pump(position, live)) for position, live in enumerate(lives)]
    try:
        running = len(lives)
        while running:
            position, item = await arrivals.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in pumps:
            task.cancel()


async def sse_stream(
    lives: list[LiveRequest],
    opening: list[str],
    render: Callable[[int, Delta], list[str]],
    render_usage: Callable[[Usage], str],
    with_logprobs: bool,
) -> AsyncIterator[str]:
    """The SSE body: opening chunks, the chunks of each choice delta (`render` is given the position
    of its request in `lives`), usage if asked for, then `[DONE]`.

    A failure after the response started becomes an in-band error event (as vLLM does). Closing
    the body early (the client went away: Starlette cancels it) aborts the requests on the node.
    """
    try:
        for chunk in opening:
            yield chunk
        async for position, output in _outputs(lives):
            for delta in lives[position].deltas(output, with_logprobs):
                for chunk in render(position, delta):
                    yield chunk
        if lives[0].include_usage:
            yield render_usage(total_usage(lives))
    except Exception as error:  # noqa: BLE001 - too late for an HTTP status: report it in the stream
        yield sse_event(body_of(_generation_error(error, lives[0].id)))
    finally:
        for live in lives:
            live.stream.close()
    yield SSE_DONE


async def collect(live: LiveRequest, request: Request) -> RequestOutput | None:
    """The request's whole output; None if the client disconnected first (the request is aborted)."""
    stream = live.stream

    async def last() -> RequestOutput:
        final = RequestOutput(live.id, None, [])
        async for output in stream:
            final.add(output)
            for choice in output.outputs:
                live.count(choice.token_ids)
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
            raise _generation_error(error, stream.request_id) from None
    finally:
        watching.cancel()
        collecting.cancel()
        stream.close()


def _generation_error(error: BaseException, request_id: str) -> AegaeonError:
    """An error reported for a running request, as the client should see it."""
    if isinstance(error, AegaeonError):  # the node's own word: shed, failed, no longer answering
        return error
    return internal_error(error, request_id, "generation")
