"""A model's tokenizer: encode, decode, chat template and end-of-sequence ids.

Load one `Tokenizer` per model and keep it for the model's lifetime: loading is slow (it
parses the vocabulary), and a model switch must not pay for it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# The Rust tokenizer's thread pool spins after every call and, on a small machine, takes the
# cores from the matrix products of the decode step it sits beside (measured: a 768x2304
# product went from 47 us to 7.7 ms on 2 cores). We only ever encode one text at a time.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

GENERATION_CONFIG_FILE = "generation_config.json"
# Fields a chat message must carry; OpenAI-style extras (name, tool_call_id, ...) pass through.
REQUIRED_MESSAGE_FIELDS = ("role", "content")


def _is_token_id(value: object) -> bool:
    """A non-negative int that is not a bool (bool subclasses int, but True is not a token)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _eos_ids_from_value(value: object, source: str) -> set[int]:
    """Normalize an eos_token_id entry (None, an int or a list of ints) to a set of ids."""
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if not _is_token_id(item):
            raise ValueError(f"{source}: eos_token_id must be a token id or a list of them, got {value!r}")
    return set(values)


def read_generation_config_eos(model_dir: str | Path) -> set[int]:
    """The eos_token_id(s) in `model_dir`/generation_config.json; empty if the file is absent."""
    config_path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not config_path.is_file():
        return set()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return _eos_ids_from_value(config.get("eos_token_id"), str(config_path))


def validate_chat_messages(messages: object) -> None:
    """Raise ValueError unless `messages` is a non-empty list of {role: str, content: str} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for field in REQUIRED_MESSAGE_FIELDS:
            if field not in message:
                raise ValueError(f"messages[{index}] has no {field!r}")
            if not isinstance(message[field], str):
                raise ValueError(
                    f"messages[{index}][{field!r}] must be a string, got {type(message[field]).__name__}"
                )


def _plain_backend(hf_tokenizer: PreTrainedTokenizerBase) -> Any | None:
    """The Rust tokenizer of a fast tokenizer whose `decode` is that tokenizer's own (no override), else None.

    Detokenization decodes twice per generated token; through transformers' Python layers that is
    about 10 us a call, a few percent of a batch-16 decode step on a small model.
    """
    if not getattr(hf_tokenizer, "is_fast", False):
        return None
    mro = type(hf_tokenizer).__mro__
    decoder_class = next((c for c in mro if "_decode" in vars(c)), None)
    backend_class = next((c for c in mro if "backend_tokenizer" in vars(c)), None)
    if backend_class is None or decoder_class is not backend_class:
        return None
    return hf_tokenizer.backend_tokenizer


class Tokenizer:
    """A Hugging Face tokenizer plus the model's full set of end-of-sequence token ids."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int] = ()) -> None:
        """`eos_token_ids` are added to the tokenizer's own eos_token_id (if it has one)."""
        if not isinstance(hf_tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"hf_tokenizer must be a transformers tokenizer, got {type(hf_tokenizer).__name__}"
            )
        eos = _eos_ids_from_value(list(eos_token_ids), "eos_token_ids")
        eos |= _eos_ids_from_value(hf_tokenizer.eos_token_id, "tokenizer")
        self._hf = hf_tokenizer
        self._backend = _plain_backend(hf_tokenizer)
        self._eos_token_ids = frozenset(eos)
        self._all_special_ids = frozenset(hf_tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """Load from a model directory (or anything AutoTokenizer accepts); kwargs go to AutoTokenizer."""
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        eos = read_generation_config_eos(path) if Path(path).is_dir() else set()
        return cls(hf_tokenizer, eos)

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added/special tokens included."""
        # `hf.vocab_size` leaves out added tokens (e.g. ChatML markers), which models do generate.
        return len(self._hf)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos plus generation_config.json's."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._all_special_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the tokenizer's BOS/EOS wrapping, if any."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the vocabulary lacks decode to nothing."""
        if self._backend is not None:
            return self._backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)
        # Legacy "clean up tokenization spaces" rewrites text across token boundaries (" ." -> "."),
        # which would make streamed deltas disagree with a full decode; never apply it.
        return self._hf.decode(
            self._checked_ids(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Prompt token ids for a chat, rendered with the model's chat template; `tools` (OpenAI's
        function definitions) go to the template, which tells the model about them."""
        if not self.has_chat_template:
            raise ValueError(
                f"tokenizer {self._hf.name_or_path!r} has no chat template; use a plain-text prompt instead"
            )
        validate_chat_messages(messages)
        text = self._hf.apply_chat_template(
            list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        # The template already writes any BOS / special markers; encoding must not add them twice.
        return self.encode(text, add_special_tokens=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings of `ids` (byte-level BPE shows e.g. 'Ġ' for a space)."""
        return list(self._hf.convert_ids_to_tokens(self._checked_ids(ids)))

    def token_text(self, token_id: int) -> str:
        """Readable text of one token, for logprobs; a partial UTF-8 character shows as U+FFFD."""
        return self.decode([token_id], skip_special_tokens=False)

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        for token_id in ids:
            if not _is_token_id(token_id):
                raise ValueError(f"token ids must be non-negative ints, got {token_id!r}")
        return ids
