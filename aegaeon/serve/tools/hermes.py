"""Hermes / Qwen tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one per call."""

from __future__ import annotations

import json
import re

from aegaeon.engine.sampling_params import GrammarSpec
from aegaeon.serve import tools
from aegaeon.serve.protocol import Tool


class HermesParser:
    ARGUMENTS_KEY = "arguments"
    START = "<tool_call>"
    END = "</tool_call>"
    _BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)

    def parse(self, text: str) -> tools.ParsedReply:
        """Content before the first call (None if empty) and the calls that parse."""
        start = text.find(self.START)
        if start < 0:
            return tools.ParsedReply(text, [])
        calls = [
            tools.read_call(block.strip(), self.ARGUMENTS_KEY) for block in self._BLOCK.findall(text, start)
        ]
        if not calls or None in calls:  # not well-formed calls: the reply stays text
            return tools.ParsedReply(text, [])
        content = text[:start].strip()
        return tools.ParsedReply(content or None, calls)  # type: ignore[arg-type]

    def calls_start(self, text: str, final: bool) -> int | None:
        start = text.find(self.START)
        return start if start >= 0 else None

    def held_back(self, text: str) -> int:
        """Length of the longest end of `text` that may be the start of a call marker."""
        for length in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-length:]):
                return length
        return 0

    def complete_calls(self, text: str, final: bool) -> tuple[list[tools.ParsedCall], int]:
        """The calls closed in `text` (which starts at a call marker) and how much of it they took."""
        calls, consumed = [], 0
        for block in self._BLOCK.finditer(text):
            call = tools.read_call(block.group(1).strip(), self.ARGUMENTS_KEY)
            if call is None:
                break
            calls.append(call)
            consumed = block.end()
        return calls, consumed

    def grammar(self, choices: list[Tool], parallel: bool) -> GrammarSpec:
        """A reply of calls of `choices` only: one, or with parallel calls one or more."""
        schema = json.dumps(tools.calls_schema(choices, self.ARGUMENTS_KEY))
        repeat = "+" if parallel else ""
        lark = f'start: call{repeat}\ncall: "{self.START}\\n" %json {schema} "\\n{self.END}\\n"'
        return GrammarSpec("grammar", lark, "tool_choice")
