"""Tool calls in a model's output: a parser per format, chosen for the model from its chat template.

A parser knows its format three ways: how to read calls out of a finished reply (`parse`), how to
stream them (`ToolCallStream`: text before the calls goes out as content, each call once complete),
and the grammar that makes a reply nothing but calls of given tools (tool_choice required or named).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.protocol import Tool

# Compact JSON inside tool calls: the grammar then leaves a model no whitespace to pad with.
JSON_GRAMMAR_OPTIONS = {"whitespace_flexible": False}
TOOL_CALL_ID_PREFIX = "call_"
TOOL_CALL_ID_HEX = 24


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"{TOOL_CALL_ID_PREFIX}{uuid.uuid4().hex[:TOOL_CALL_ID_HEX]}")


@dataclass
class ParsedReply:
    content: str | None
    calls: list[ParsedCall]


def call_schema(tool: Tool, arguments_key: str) -> dict:
    """The JSON schema of one call of `tool`: its name, and arguments that match its parameters."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            arguments_key: tool.function.parameters,
        },
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def calls_schema(tools: list[Tool], arguments_key: str) -> dict:
    """A call of any one of `tools`, as compact JSON."""
    return {"anyOf": [call_schema(tool, arguments_key) for tool in tools], "x-guidance": JSON_GRAMMAR_OPTIONS}


def read_call(text: str, arguments_key: str) -> ParsedCall | None:
    """A call from its JSON text (`{"name": ..., arguments_key: {...}}`), or None if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", {}))
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


from aegaeon.serve.tools.hermes import HermesParser  # noqa: E402 - they use the helpers above
from aegaeon.serve.tools.llama3 import Llama3JsonParser  # noqa: E402

ToolCallParser = HermesParser | Llama3JsonParser


def parser_for(tokenizer: Tokenizer) -> ToolCallParser:
    """The format the model's chat template teaches: Llama 3's JSON calls, else Hermes/Qwen `<tool_call>`."""
    template = str(getattr(tokenizer.hf_tokenizer, "chat_template", None) or "")
    if HermesParser.START not in template and Llama3JsonParser.TEMPLATE_MARK in template:
        return Llama3JsonParser()
    return HermesParser()


class ToolCallStream:
    """One choice's streamed text split into content and complete tool calls, as it arrives."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self._pending = ""  # text not yet sent: a possible start of calls, or calls in progress
        self._in_calls = False
        self.calls: list[ParsedCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        """Content to send now, and the calls completed by `text`; `final` flushes what is left."""
        self._pending += text
        content = ""
        if not self._in_calls:
            start = self.parser.calls_start(self._pending, final)
            if start is None:  # no calls (yet): send all but what may begin them
                keep = 0 if final else self.parser.held_back(self._pending)
                content, self._pending = (
                    self._pending[: len(self._pending) - keep],
                    self._pending[len(self._pending) - keep :],
                )
                return content, []
            content, self._pending = self._pending[:start], self._pending[start:]
            self._in_calls = True
        calls, consumed = self.parser.complete_calls(self._pending, final)
        self._pending = self._pending[consumed:]
        if final and self._pending.strip():  # not calls after all: what the model wrote goes out as text
            content += self._pending
            self._pending = ""
        self.calls.extend(calls)
        return content, calls
