"""Llama 3 tool calls: the whole reply is `{"name": ..., "parameters": {...}}` (calls joined by `; `)."""

from __future__ import annotations

import json

from aegaeon.engine.sampling_params import GrammarSpec
from aegaeon.serve import tools
from aegaeon.serve.protocol import Tool

# Llama 3.1+ may open a call with this token.
PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


class Llama3JsonParser:
    ARGUMENTS_KEY = "parameters"
    # What Llama 3's chat template says to the model about calls.
    TEMPLATE_MARK = '"parameters": dictionary of argument name and its value'

    def parse(self, text: str) -> tools.ParsedReply:
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return tools.ParsedReply(text, [])
        calls = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            try:
                _, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return tools.ParsedReply(text, [])
            call = tools.read_call(body[position:end], self.ARGUMENTS_KEY)
            if call is None:
                return tools.ParsedReply(text, [])
            calls.append(call)
            position = end
            while position < len(body) and body[position] in f" \n{SEPARATOR}":
                position += 1
        return tools.ParsedReply(None, calls)

    def calls_start(self, text: str, final: bool) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{") or stripped.startswith(PYTHON_TAG):
            return 0
        return None

    def held_back(self, text: str) -> int:
        # Until something but whitespace arrives, the reply may still open with a call.
        stripped = text.lstrip()
        if not stripped or PYTHON_TAG.startswith(stripped):
            return len(text)
        return 0

    def complete_calls(self, text: str, final: bool) -> tuple[list[tools.ParsedCall], int]:
        """Calls are read once the reply is complete (a JSON object may close several times)."""
        if not final:
            return [], 0
        parsed = self.parse(text)
        return (parsed.calls, len(text)) if parsed.calls else ([], 0)

    def grammar(self, choices: list[Tool], parallel: bool) -> GrammarSpec:
        """A reply that is one call of `choices` (Llama 3 makes one call per turn)."""
        return GrammarSpec(
            "json_schema", json.dumps(tools.calls_schema(choices, self.ARGUMENTS_KEY)), "tool_choice"
        )
