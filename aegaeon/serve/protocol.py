"""Requests and responses of the OpenAI API (the subset served here), as pydantic models.

Requests are validated strictly (a string is not an int, 1 is not a bool) so that a client's type
mistake is reported instead of guessed at; unknown fields are ignored, as the OpenAI API and vLLM
ignore them. Value ranges are checked by `SamplingParams`, whose messages name the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from aegaeon.engine.sampling_params import MAX_LOGPROBS, SamplingParams

# OpenAI's default `max_tokens` for /v1/completions (chat has none: it runs to the context limit).
DEFAULT_COMPLETION_MAX_TOKENS = 16
OWNED_BY = "aegaeon"
# Roles the OpenAI chat API defines; the chat template decides what each means.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

Prompt = str | list[int]
FinishReason = Literal["stop", "length"]


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style, e.g. `cmpl-<32 hex>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    """OpenAI's `created`: Unix seconds."""
    return int(time.time())


def require_unicode(text: str) -> str:
    """`text` if it is valid Unicode; ValueError on a lone surrogate, which no tokenizer can encode.

    JSON lets a string hold `\\ud800` on its own (half of a UTF-16 pair); Python keeps it as a
    surrogate code point that cannot be written as UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        raise ValueError(
            f"must be valid Unicode text, but character {error.start} is a lone surrogate "
            f"(\\u{ord(char):04x}): an escape in \\ud800-\\udfff must be half of a surrogate pair"
        ) from None
    return text


# A string the server tokenizes or matches against generated text.
Text = Annotated[str, AfterValidator(require_unicode)]


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def normalize_prompt(value: object) -> Prompt:
    """A string, a list of token ids, or a list holding one of those -> the prompt itself."""
    if isinstance(value, str):
        return require_unicode(value)
    if _is_token_ids(value):
        return value  # type: ignore[return-value]
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str) or _is_token_ids(value[0])):
        return normalize_prompt(value[0])
    several = isinstance(value, list) and len(value) > 1
    if several and all(isinstance(p, str) or _is_token_ids(p) for p in value):  # type: ignore[union-attr]
        raise ValueError(f"only one prompt per request is supported, got {len(value)}: send one request each")
    raise ValueError("must be a string, a list of non-negative token ids, or a list holding one of those")


def normalize_stop(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [require_unicode(value)]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [require_unicode(s) for s in value]
    raise ValueError("must be a string or a list of strings")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """The fields shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-monitoring id means nothing here

    @field_validator("stop", mode="before")
    @classmethod
    def _normalize_stop(cls, value: object) -> list[str] | None:
        return normalize_stop(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; InvalidRequest (naming the field) on a value out of range."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "seed",
                "stop",
                "stop_token_ids",
            )
            if getattr(self, name) is not None
        }
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **given,
        )


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`."""

    prompt: Any  # str | list[int] | [str] | [list[int]], normalized to str | list[int]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _normalize_prompt(cls, value: object) -> Prompt:
        return normalize_prompt(value)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported; send echo=false")
        return value

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)

    def length_field(self) -> str:
        """The field that gives the completion's length."""
        return "max_tokens"


def normalize_content(value: object) -> str | None:
    """Message content: a string, or a list of `{"type": "text", "text": ...}` parts joined."""
    if value is None:
        return value
    if isinstance(value, str):
        return require_unicode(value)
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ValueError('only text content parts ({"type": "text", "text": "..."}) are supported')
            texts.append(require_unicode(part["text"]))
        return "".join(texts)
    raise ValueError("must be a string or a list of text content parts")


class ChatMessage(_Strict):
    """One message of a conversation; list content may hold only text parts."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | None = None
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _normalize_content(cls, value: object) -> str | None:
        return normalize_content(value)

    def text(self) -> str:
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        message = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def sampling_params(self) -> SamplingParams:
        # None runs until the context is full, as OpenAI and vLLM do for chat.
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(limit, (self.top_logprobs or 0) if self.logprobs else None)

    def length_field(self) -> str:
        """The field that gives the completion's length: the one the client sent."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.for_template() for message in self.messages]


class TokenizeRequest(_Strict):
    """`POST /tokenize`: a prompt, or chat messages rendered through the chat template."""

    model: str
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    """`POST /detokenize`."""

    model: str
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, tokens: list[int]) -> list[int]:
        if any(t < 0 for t in tokens):
            raise ValueError("token ids must be >= 0")
        return tokens


# -- responses --------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelLocation(BaseModel):
    """Where a model is: on a node (`host`, `loading`, `disk`), or `device` on one of its instances."""

    node: str
    instance: str | None = None
    state: str


class ModelSettings(BaseModel):
    """A registered model's path and settings (`priority` is recorded, not yet used in scheduling)."""

    path: str
    ttft_s: float | None = None
    tbt_s: float | None = None
    priority: int = 0
    pinned: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNED_BY
    max_model_len: int
    # aegaeon's own fields (OpenAI clients ignore them): the best state of the model anywhere
    # (`device`, `host`, `loading`, `disk`), where it is, and its registry settings.
    state: str
    locations: list[ModelLocation] = []
    settings: ModelSettings | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
