"""Requests and responses of the OpenAI API (the subset served here), as pydantic models.

Requests are validated strictly (a string is not an int, 1 is not a bool) so that a client's type
mistake is reported instead of guessed at. A field of the OpenAI or vLLM request schemas that changes
what the reply means is honoured or refused with a 400 naming it (`UNSUPPORTED_FIELDS`), never
ignored; fields that are pure metadata (`user`, `metadata`, `store`, ...) and fields of neither schema
are ignored. Value ranges are checked by `SamplingParams`, whose messages name the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from aegaeon.config import DEFAULT_PRIORITY
from aegaeon.engine.sampling_params import MAX_LOGPROBS, GrammarSpec, SamplingParams
from aegaeon.errors import InvalidRequest

# OpenAI's default `max_tokens` for /v1/completions (chat has none: it runs to the context limit).
DEFAULT_COMPLETION_MAX_TOKENS = 16
OWNED_BY = "aegaeon"
# Roles the OpenAI chat API defines; the chat template decides what each means.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

Prompt = str | list[int]
FinishReason = Literal["stop", "length", "tool_calls"]

# Fields of the OpenAI and vLLM request schemas this server does not implement, with the values that
# mean the same as leaving them out; any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    # OpenAI
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    # vLLM
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "spaces_between_special_tokens": (None, True),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "guided_whitespace_pattern": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "continue_final_message": (None, False),
    "documents": (None, []),
    "mm_processor_kwargs": (None, {}),
    "thinking_token_budget": (None,),
    "vllm_xargs": (None, {}),
}
# ... and those that differ between the routes.
UNSUPPORTED_COMPLETION_FIELDS: dict[str, tuple[Any, ...]] = {"add_special_tokens": (None, True)}
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "add_special_tokens": (None, False),
    "prompt_logprobs": (None,),
}


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


def normalize_prompts(value: object) -> list[Prompt]:
    """A string, a list of token ids, or a non-empty list of those -> the list of prompts."""
    if isinstance(value, str):
        return [require_unicode(value)]
    if _is_token_ids(value) and value:
        return [value]  # type: ignore[list-item]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
        return [require_unicode(p) if isinstance(p, str) else p for p in value]
    raise ValueError("must be a string, a list of non-negative token ids, or a non-empty list of those")


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
    # vLLM's: with include_usage, every chunk carries the usage so far, not only a last chunk of its own.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: the schema the reply must match (enforced, strict or not)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Text] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


def _schema_text(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _one_grammar(given: list[GrammarSpec]) -> GrammarSpec | None:
    if len(given) > 1:
        names = ", ".join(spec.param for spec in given)
        raise InvalidRequest(f"send at most one output constraint, got {names}", param=given[1].param)
    return given[0] if given else None


def refuse_unsupported(body: BaseModel, table: dict[str, tuple[Any, ...]]) -> None:
    """InvalidRequest naming the first field the server would otherwise have to ignore."""
    extra = body.model_extra or {}
    for name, neutral in table.items():
        if name in extra and not any(extra[name] == value for value in neutral):
            raise InvalidRequest(
                f"{name} is not supported by this server; leave it out (got {extra[name]!r:.60})", param=name
            )


class _SamplingRequest(_Strict):
    """The fields shared by completions and chat completions."""

    # Extra fields are kept, so that the unsupported ones can be refused by name.
    model_config = ConfigDict(strict=True, extra="allow")

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
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-monitoring id means nothing here

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_id_keys(cls, value: object) -> object:
        if isinstance(value, dict):
            for key in value:
                if not (isinstance(key, str) and key.isdigit()):
                    raise ValueError(f"keys must be token ids, got {key!r}")
        return value

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

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (vLLM's `continuous_usage_stats`, which counts only with include_usage)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def grammar_specs(self) -> list[GrammarSpec]:
        """The output constraints the request gives (structured outputs), each named by its field."""
        given: list[GrammarSpec] = []
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_object":
            given.append(GrammarSpec("json_object", "", "response_format"))
        elif response_format is not None and response_format.type == "json_schema":
            schema = response_format.json_schema.schema_  # type: ignore[union-attr]
            given.append(GrammarSpec("json_schema", _schema_text(schema), "response_format.json_schema"))
        if self.guided_json is not None:
            given.append(GrammarSpec("json_schema", _schema_text(self.guided_json), "guided_json"))
        if self.guided_regex is not None:
            given.append(GrammarSpec("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            given.append(GrammarSpec("choice", json.dumps(self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            given.append(GrammarSpec("grammar", self.guided_grammar, "guided_grammar"))
        outputs = self.structured_outputs
        if outputs is not None:
            if outputs.json_ is not None:
                given.append(
                    GrammarSpec("json_schema", _schema_text(outputs.json_), "structured_outputs.json")
                )
            if outputs.regex is not None:
                given.append(GrammarSpec("regex", outputs.regex, "structured_outputs.regex"))
            if outputs.choice is not None:
                given.append(GrammarSpec("choice", json.dumps(outputs.choice), "structured_outputs.choice"))
            if outputs.grammar is not None:
                given.append(GrammarSpec("grammar", outputs.grammar, "structured_outputs.grammar"))
            if outputs.json_object:
                given.append(GrammarSpec("json_object", "", "structured_outputs.json_object"))
        return given

    def _sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: GrammarSpec | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
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
            min_tokens=self.min_tokens,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
            **given,
        )


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`: one prompt or several (choices are indexed prompt-major)."""

    prompt: Any  # str | list[int] | list[str | list[int]], normalized to list[str | list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=0)  # 0: only the echoed prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _normalize_prompt(cls, value: object) -> list[Prompt]:
        return normalize_prompts(value)

    @property
    def prompts(self) -> list[Prompt]:
        return self.prompt

    def check_supported(self) -> None:
        refuse_unsupported(self, UNSUPPORTED_FIELDS | UNSUPPORTED_COMPLETION_FIELDS)

    def sampling_params(self) -> SamplingParams:
        # Prompt logprobs are computed for echo (with logprobs) and for prompt_logprobs, the larger k.
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        # No new token asked for: one is generated (the prefill that scores the prompt samples one) and
        # dropped, so the engine's max_tokens is 1.
        max_tokens = 1 if self.max_tokens == 0 else self.max_tokens
        grammar = _one_grammar(self.grammar_specs())
        return self._sampling_params(max_tokens, self.logprobs, grammar, max(wanted) if wanted else None)

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
        """The message as chat templates take it: tool calls with their arguments as objects."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        extra = self.model_extra or {}
        if isinstance(extra.get("tool_call_id"), str):
            message["tool_call_id"] = extra["tool_call_id"]
        if isinstance(extra.get("tool_calls"), list):
            message["tool_calls"] = [_call_for_template(call) for call in extra["tool_calls"]]
        return message


def _call_for_template(call: object) -> object:
    """A tool call of an earlier assistant message, its JSON-text arguments parsed (templates index them)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass  # the template gets the text as the client sent it
    return {**call, "function": function}


class FunctionDefinition(_Strict):
    name: Text
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice in ("auto", "required") or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names():
            raise ValueError(
                f"tool_choice names function {choice.function.name!r}, which tools does not define"
            )
        return self

    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or []]

    @property
    def uses_tools(self) -> bool:
        """Whether the model is offered the tools (tool_choice none turns them off)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools the reply must call one of (tool_choice required or named), else []."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, NamedToolChoice):
            return [tool for tool in self.tools or [] if tool.function.name == self.tool_choice.function.name]
        return []

    def check_supported(self) -> None:
        refuse_unsupported(self, UNSUPPORTED_FIELDS | UNSUPPORTED_CHAT_FIELDS)

    def sampling_params(self, tool_grammar: GrammarSpec | None = None) -> SamplingParams:
        """The engine's parameters; `tool_grammar` constrains the reply to calls of the forced tools."""
        # None runs until the context is full, as OpenAI and vLLM do for chat.
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        specs = self.grammar_specs() + ([tool_grammar] if tool_grammar is not None else [])
        return self._sampling_params(
            limit, (self.top_logprobs or 0) if self.logprobs else None, _one_grammar(specs)
        )

    def length_field(self) -> str:
        """The field that gives the completion's length: the one the client sent."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.for_template() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (OpenAI's shape), or None when not offered."""
        if not self.uses_tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []]


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
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry for one candidate at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM: per prompt token (the first: None), its candidates by token id
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


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
    """A registered model's path and settings."""

    path: str
    ttft_s: float | None = None
    tbt_s: float | None = None
    priority: float = DEFAULT_PRIORITY
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
