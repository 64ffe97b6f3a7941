"""Structured outputs: a request's grammar compiled once per model and spec, matched per sequence.

llguidance does the work: it turns a JSON schema, regex, choice list or Lark grammar into a parser
over the model's tokens, and says after each token which tokens may come next (a bitmask over the
vocabulary, computed lazily, in tens of microseconds). Each sequence has its own `GrammarMatcher`,
fed every token the post-processor appends (sampled or replayed), so a sequence handed to another
engine, swapped or recomputed resumes with its grammar in the same state.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch

from aegaeon.config import GRAMMAR_CACHE_SIZE
from aegaeon.engine.sampling_params import GrammarSpec
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.errors import InvalidRequest

# Compact JSON: with flexible whitespace a model (a random one above all) may pad forever.
JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
# The schema `json_object` stands for: any JSON object.
ANY_OBJECT_SCHEMA = '{"type": "object"}'
# llguidance's log level: errors come back as values, never printed.
SILENT = 0
BITS_PER_WORD = 32


def grammar_source(spec: GrammarSpec) -> str:
    """llguidance's grammar for `spec`; InvalidRequest naming its field when the spec is malformed."""
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, overrides=JSON_OPTIONS)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT_SCHEMA, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("the choices must be a non-empty list of strings")
            # A Lark string literal is JSON-escaped.
            alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(spec.source)
    except ValueError as error:
        raise InvalidRequest(f"{spec.param}: {error}", param=spec.param) from None


def check_grammar(spec: GrammarSpec) -> None:
    """Raise InvalidRequest, naming the field and the problem, if llguidance rejects the grammar."""
    problem = llguidance.LLMatcher.validate_grammar(grammar_source(spec))
    if problem:
        raise InvalidRequest(
            f"{spec.param} is not a grammar this server can enforce: {problem}", param=spec.param
        )


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int | None):
        self._matcher = matcher
        self._eos_token_id = eos_token_id

    def accept(self, token_id: int) -> None:
        """Advance past a generated token (one the mask allowed)."""
        self._matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """True once the grammar is complete and allows no further token."""
        return self._matcher.is_stopped()

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens as bits into `row` (int32 words on the CPU)."""
        if self._matcher.is_error():  # cannot happen for tokens the mask allowed; end the sequence
            row.zero_()
            if self._eos_token_id is not None:
                word, bit = divmod(self._eos_token_id, BITS_PER_WORD)
                row[word] = (1 << bit) - (1 << BITS_PER_WORD if bit == BITS_PER_WORD - 1 else 0)  # int32
            return
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class GrammarCompiler:
    """A model's grammars: its tokenizer as llguidance sees it, and each spec compiled once (LRU)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on first use: ~1 s for a large vocab
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar; InvalidRequest if the grammar is rejected."""
        key = (spec.kind, spec.source)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._ll(), grammar_source(spec), log_level=SILENT)
            if compiled.is_error():
                problem = compiled.get_error()
                raise InvalidRequest(
                    f"{spec.param} is not a grammar this server can enforce: {problem}", param=spec.param
                )
            self._compiled[key] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        eos = self._ll().eos_token
        return GrammarMatcher(compiled.deep_copy(), eos)

    def _ll(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            eos = sorted(self._tokenizer.eos_token_ids)
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer.hf_tokenizer, n_vocab=self._vocab_size, eos_token=eos[0] if eos else None
            )
        return self._ll_tokenizer


def bitmask_words(vocab_size: int) -> int:
    """int32 words a mask over `vocab_size` tokens takes."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A [R, W] int32 bitmask as a [R, vocab_size] bool tensor (True = allowed), on the mask's device."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
