"""Tool-call parsers: calls read from finished replies and from streamed pieces, for each format."""

from __future__ import annotations

import json

import pytest

from aegaeon.demo import build_tokenizer
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.tools import HermesParser, Llama3JsonParser, ToolCallStream, parser_for

HERMES_REPLY = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
LLAMA3_REPLY = (
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
)
EXPECTED = [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize(
    "parser, reply, content, calls",
    [
        (HermesParser(), HERMES_REPLY, "Let me look.", [*EXPECTED, ("get_time", {"zone": "CET"})]),
        (Llama3JsonParser(), LLAMA3_REPLY, None, [*EXPECTED, ("get_time", {})]),
        (HermesParser(), "No tools needed.", "No tools needed.", []),
        (Llama3JsonParser(), "Plain {text}.", "Plain {text}.", []),
        (HermesParser(), "<tool_call>\n{broken\n</tool_call>", "<tool_call>\n{broken\n</tool_call>", []),
    ],
)
def test_replies_are_parsed_into_content_and_calls(parser, reply, content, calls):
    parsed = parser.parse(reply)
    assert parsed.content == content
    assert [(call.name, json.loads(call.arguments)) for call in parsed.calls] == calls
    assert len({call.id for call in parsed.calls}) == len(calls)


@pytest.mark.parametrize(
    "parser, reply", [(HermesParser(), HERMES_REPLY), (Llama3JsonParser(), LLAMA3_REPLY)]
)
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streamed_pieces_give_the_same_content_and_calls(parser, reply, piece):
    stream = ToolCallStream(parser)
    content = ""
    pieces = [reply[i : i + piece] for i in range(0, len(reply), piece)]
    for number, text in enumerate(pieces):
        sent, _ = stream.feed(text, final=number == len(pieces) - 1)
        content += sent
        assert "<tool" not in content and "{" not in content  # nothing of a call leaks as text
    whole = parser.parse(reply)
    assert content.strip() == (whole.content or "")
    assert [(c.name, c.arguments) for c in stream.calls] == [(c.name, c.arguments) for c in whole.calls]


def test_text_that_only_looks_like_a_call_start_is_sent_in_the_end():
    stream = ToolCallStream(HermesParser())
    assert stream.feed("a <tool") == ("a ", [])
    assert stream.feed("box", final=True) == ("<toolbox", [])


def test_the_format_follows_the_chat_template():
    tokenizer = build_tokenizer()
    assert isinstance(parser_for(Tokenizer(tokenizer)), HermesParser)
    tokenizer.chat_template = (
        'Reply with {"name": function name, "parameters": dictionary of argument name and its value}'
    )
    assert isinstance(parser_for(Tokenizer(tokenizer)), Llama3JsonParser)
