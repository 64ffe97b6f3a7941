"""Per-request sampling parameters, with vLLM-compatible names, defaults and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aegaeon.errors import InvalidRequest

# OpenAI caps `top_logprobs` at 20; vLLM's default max_logprobs is also 20.
MAX_LOGPROBS = 20
# OpenAI's documented range for presence_penalty and frequency_penalty.
MIN_PENALTY = -2.0
MAX_PENALTY = 2.0
# Temperatures below this are treated as greedy (as vLLM does): dividing logits by a
# vanishing temperature overflows float32, and the distribution is an argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
# torch.Generator.manual_seed accepts any value that fits in 64 bits, signed or unsigned.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
# top_k sentinel that vLLM (and the OpenAI-compatible API) uses for "disabled", besides 0.
TOP_K_DISABLED = -1
# OpenAI's range for a logit_bias value: -100 bans a token, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0
# What a grammar constrains the output to: a JSON schema (its text), any JSON object, a regular
# expression, one of a list of strings (a JSON list), or a Lark grammar.
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def _is_int(value: object) -> bool:
    """True for ints that are not bools (bool subclasses int, but True is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence(value: object) -> bool:
    """A list or tuple (a str is a sequence too, but of characters, not of entries)."""
    return isinstance(value, (list, tuple))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_bool(name: str, value: object) -> None:
    if value is not True and value is not False:
        raise InvalidRequest(f"{name} must be a bool, got {value!r}", param=name)


def _require_finite(name: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}", param=name)
    return float(value)


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar the output must match, as text: requests cross processes with this, never compiled."""

    kind: str  # one of GRAMMAR_KINDS
    source: str  # the schema, regex, JSON list of choices or grammar; "" for json_object
    param: str  # the request field it came from, named by errors about it

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequest(
                f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}", param=self.param
            )
        if not isinstance(self.source, str):
            raise InvalidRequest(f"{self.param} must be given as text", param=self.param)


@dataclass
class SamplingParams:
    """How to sample the completion of one request; see the field comments for semantics."""

    n: int = 1  # completions to generate for the prompt
    max_tokens: int | None = 16  # None = until the context window is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = disabled
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0  # 0 = disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = disabled; applies to prompt + output tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # a single str is accepted and wrapped
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; k = sampled token's logprob + top-k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # eos and stop_token_ids are ruled out until this many tokens are generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    prompt_logprobs: int | None = None  # None = none; k = each prompt token's logprob + top-k
    grammar: GrammarSpec | None = None  # the output must match it (structured outputs)

    def __post_init__(self) -> None:
        self._validate_counts()
        self._validate_output_controls()
        self._validate_sampling()
        self._validate_penalties()
        self._validate_stops()
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _require_bool(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def _validate_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise InvalidRequest(f"n must be an int >= 1, got {self.n!r}", param="n")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequest(
                f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}", param="max_tokens"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequest(
                f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                param="logprobs",
            )
        if self.seed is not None and (not _is_int(self.seed) or not MIN_SEED <= self.seed <= MAX_SEED):
            raise InvalidRequest(
                f"seed must be None or an int that fits in 64 bits, got {self.seed!r}", param="seed"
            )

    def _validate_output_controls(self) -> None:
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequest(
                f"min_tokens must be an int >= 0, got {self.min_tokens!r}", param="min_tokens"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequest(
                f"prompt_logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                f"got {self.prompt_logprobs!r}",
                param="prompt_logprobs",
            )
        bias = {} if self.logit_bias is None else self.logit_bias
        if not isinstance(bias, dict):
            raise InvalidRequest(
                f"logit_bias must map token ids to numbers, got {bias!r}", param="logit_bias"
            )
        for token_id, value in bias.items():
            if not _is_int(token_id) or token_id < 0:
                raise InvalidRequest(f"logit_bias: {token_id!r} is not a token id", param="logit_bias")
            value = _require_finite("logit_bias", value)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise InvalidRequest(
                    f"logit_bias: the bias of token {token_id} must be in "
                    f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value:g}",
                    param="logit_bias",
                )
        self.logit_bias = {token_id: float(value) for token_id, value in bias.items()}

    def _validate_sampling(self) -> None:
        self.temperature = _require_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature:g}", param="temperature")
        self.top_p = _require_finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p:g}", param="top_p")
        if not _is_int(self.top_k) or (self.top_k < 0 and self.top_k != TOP_K_DISABLED):
            raise InvalidRequest(
                f"top_k must be an int >= 0, or -1 to disable, got {self.top_k!r}", param="top_k"
            )
        self.min_p = _require_finite("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p:g}", param="min_p")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_finite(name, getattr(self, name))
            if not MIN_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequest(
                    f"{name} must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}], got {value:g}", param=name
                )
            setattr(self, name, value)
        self.repetition_penalty = _require_finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequest(
                f"repetition_penalty must be > 0, got {self.repetition_penalty:g}", param="repetition_penalty"
            )

    def _validate_stops(self) -> None:
        stop = [] if self.stop is None else self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not _is_sequence(stop) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(
                f"stop must be a non-empty str or a list of non-empty str, got {stop!r}", param="stop"
            )
        self.stop = list(stop)

        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not _is_sequence(ids) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequest(
                f"stop_token_ids must be a list of ints >= 0, got {ids!r}", param="stop_token_ids"
            )
        self.stop_token_ids = list(ids)
