"""Tests for aegaeon.engine.detokenizer: streaming detokenization and stop strings."""

from __future__ import annotations

import random

import pytest

from aegaeon.demo import EOS_TOKEN, IM_END_TOKEN, build_tokenizer
from aegaeon.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from aegaeon.engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MULTIBYTE_TEXTS = ["日本語", "🙂", "café", "naïve résumé", "a 🙂🙂 b 日本語 c café."]
TEXTS = [
    "The old lighthouse stood at the edge of the harbor.",
    "Hello café, 日本語 and 🙂!",
    "naïve résumé 日本語🙂🙂 done",
    "one . two , three ?",
    "",
]
RANDOM_TRIALS = 400
MAX_RANDOM_TOKENS = 40


class RecordingTokenizer(Tokenizer):
    """Records the longest id list decoded, to check that per-token cost stays bounded."""

    longest_decode = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest_decode = max(self.longest_decode, len(ids))
        return super().decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(build_tokenizer())


def _stream(tokenizer, prompt_ids, generated_ids, skip_special_tokens=True):
    """Feed `generated_ids` one by one; return (deltas, flushed tail, detokenizer)."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.add(token_id) for token_id in generated_ids]
    return deltas, detokenizer.flush(), detokenizer


def _char_tokens(tokenizer, char):
    return tokenizer.encode(char, add_special_tokens=False)


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    # Makes the tests below meaningful: some characters really span several byte-level tokens.
    split = [char for char in "日本語🙂" if len(_char_tokens(tokenizer, char)) > 1]
    assert split, "demo tokenizer keeps every multi-byte character in one token"
    assert any(REPLACEMENT in tokenizer.token_text(token_id) for token_id in _char_tokens(tokenizer, "🙂"))


@pytest.mark.parametrize("text", TEXTS + MULTIBYTE_TEXTS)
def test_valid_text_streams_without_replacement_chars(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])
    generated = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail, detokenizer = _stream(tokenizer, prompt, generated)
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert tail == ""
    assert "".join(deltas) == text == detokenizer.text


def test_incomplete_character_is_held_back_until_complete(tokenizer):
    smile = _char_tokens(tokenizer, "🙂")
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi "))
    assert [detokenizer.add(token_id) for token_id in smile[:-1]] == [""] * (len(smile) - 1)
    assert detokenizer.add(smile[-1]) == "🙂"
    assert detokenizer.add(tokenizer.encode("!")[0]) == "!"
    assert detokenizer.text == "🙂!"


def test_flush_releases_incomplete_character(tokenizer):
    partial = _char_tokens(tokenizer, "日")[:-1]
    deltas, tail, detokenizer = _stream(tokenizer, [], partial)
    assert deltas == [""] * len(partial)
    assert tail == tokenizer.decode(partial) == REPLACEMENT
    assert detokenizer.text == REPLACEMENT
    assert detokenizer.flush() == ""  # idempotent


def _random_generation(tokenizer, rng):
    """Random ids: arbitrary tokens (invalid UTF-8 included), real text, and special tokens."""
    kind = rng.randrange(3)
    if kind == 0:
        return [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, MAX_RANDOM_TOKENS))]
    ids = []
    for _ in range(rng.randrange(1, 5)):
        ids += tokenizer.encode(rng.choice(TEXTS + MULTIBYTE_TEXTS), add_special_tokens=False)
        if rng.random() < 0.3:
            ids.append(rng.choice(sorted(tokenizer.all_special_ids)))
        if kind == 2:
            ids += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 8))]
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234 + skip_special_tokens)
    saw_split_character = False
    for _ in range(RANDOM_TRIALS):
        generated = _random_generation(tokenizer, rng)
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=rng.random() < 0.5)
        deltas, tail, detokenizer = _stream(tokenizer, prompt, generated, skip_special_tokens)
        expected = tokenizer.decode(generated, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) + tail == expected == detokenizer.text, generated
        saw_split_character |= any(
            delta == "" and REPLACEMENT in tokenizer.token_text(token_id)
            for delta, token_id in zip(deltas, generated, strict=True)
        )
    assert saw_split_character


def test_special_tokens_shown_or_skipped(tokenizer):
    ids = tokenizer.encode(f"日本{IM_END_TOKEN}語{EOS_TOKEN}", add_special_tokens=False)
    assert "".join(_stream(tokenizer, [], ids, skip_special_tokens=True)[0]) == "日本語"
    shown = "".join(_stream(tokenizer, [], ids, skip_special_tokens=False)[0])
    assert shown == f"日本{IM_END_TOKEN}語{EOS_TOKEN}"


def test_skipped_special_token_inside_a_character(tokenizer):
    # With skip_special_tokens the bytes around a special token join up in a full decode.
    first, *rest = _char_tokens(tokenizer, "日")
    special = sorted(tokenizer.all_special_ids)[0]
    # The run of invalid bytes in front makes the detokenizer look for a cut among pending tokens,
    # which must not fall between the lead byte and the special token.
    for run_length, specials in [(0, 1), (7, 1), (6, 2), (5, 3), (13, 3)]:
        generated = [*rest[:1] * run_length, first, *[special] * specials, *rest, *tokenizer.encode(" x")]
        for skip in (True, False):
            deltas, tail, _ = _stream(tokenizer, [], generated, skip)
            assert "".join(deltas) + tail == tokenizer.decode(generated, skip_special_tokens=skip)


def test_prompt_ending_inside_a_character(tokenizer):
    # The generated bytes complete no character of their own: they decode as in a full decode.
    bytes_of_char = _char_tokens(tokenizer, "🙂")
    prompt = tokenizer.encode("Hi ") + bytes_of_char[:1]
    generated = bytes_of_char[1:] + tokenizer.encode(" ok", add_special_tokens=False)
    deltas, tail, _ = _stream(tokenizer, prompt, generated)
    assert "".join(deltas) + tail == tokenizer.decode(generated)


def test_long_invalid_run_keeps_window_bounded(tokenizer):
    recording = RecordingTokenizer(build_tokenizer())
    first, *continuations = _char_tokens(tokenizer, "日")
    rng = random.Random(7)
    generated = []
    for _ in range(100):
        # Orphan continuation bytes are invalid UTF-8; a lead byte may still be completed later.
        generated += [rng.choice(continuations) for _ in range(rng.randrange(20))]
        generated += rng.choice([[first], [first, *continuations], tokenizer.encode(" x")])
    deltas, tail, _ = _stream(recording, tokenizer.encode("Go"), generated)
    assert "".join(deltas) + tail == tokenizer.decode(generated)
    assert recording.longest_decode < 4 * len(continuations) + 32, "decode window grew with the output"


def test_window_bounded_for_valid_text(tokenizer):
    recording = RecordingTokenizer(build_tokenizer())
    generated = tokenizer.encode(" ".join(MULTIBYTE_TEXTS + TEXTS) * 20, add_special_tokens=False)
    deltas, _, _ = _stream(recording, [], generated)
    assert recording.longest_decode <= 16
    assert len(deltas) == len(generated)


def test_invalid_use(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    with pytest.raises(ValueError, match="non-negative"):
        detokenizer.add(-1)
    with pytest.raises(ValueError, match="non-negative"):
        detokenizer.add("a")
    detokenizer.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        detokenizer.add(5)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        IncrementalDetokenizer(tokenizer, [1, -2])
    with pytest.raises(ValueError, match="Tokenizer"):
        IncrementalDetokenizer(build_tokenizer(), [])


# --- stop strings ---------------------------------------------------------------------------------


def _reference_stop(text, stops, include):
    """Cut `text` at the earliest-starting stop occurrence (shortest on ties); return (text, stop)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start, len(stop)) < (best[0], len(best[1]))):
            best = (start, stop)
    if best is None:
        return text, None
    start, stop = best
    return text[: start + len(stop)] if include else text[:start], stop


def _random_split(text, rng, max_piece=6):
    pieces, position = [], 0
    while position < len(text):
        size = rng.randrange(0, max_piece)  # empty deltas happen (tokens that complete nothing)
        pieces.append(text[position : position + size])
        position += size
    return pieces


def _run_matcher(matcher, pieces):
    """Feed pieces until stopped; return (emitted text, whether a feed reported the stop)."""
    emitted = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True
    emitted.append(matcher.finish())
    return "".join(emitted), False


@pytest.mark.parametrize("include", [False, True])
def test_stop_matches_reference_for_random_splits(include):
    rng = random.Random(99 + include)
    alphabet = "abcx"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(4))
        ]
        matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
        emitted = []
        for piece in _random_split(text, rng):
            out, stopped = matcher.feed(piece)
            emitted.append(out)
            longest = max((len(stop) for stop in stops), default=1)
            assert len(matcher.held_back) < longest
            if stopped:
                break
        else:
            emitted.append(matcher.finish())
        expected, expected_stop = _reference_stop(text, stops, include)
        assert "".join(emitted) == expected, (text, stops)
        assert matcher.matched == expected_stop


def test_stop_spanning_deltas():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.held_back == "ST"
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P and more") == ("", True)
    assert matcher.matched == "STOP"
    assert matcher.feed("later") == ("", True)  # nothing after the stop is ever emitted
    assert matcher.finish() == ""


def test_false_start_is_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("ep") == ("STep", False)
    assert matcher.matched is None


def test_stop_at_very_start():
    matcher = StopStringMatcher(["\n\n", "END"])
    assert matcher.feed("END of it") == ("", True)
    assert matcher.matched == "END"


def test_overlapping_stops():
    for stops in (["ab", "bc"], ["bc", "ab"]):
        assert _run_matcher(StopStringMatcher(stops), ["x", "a", "bc"]) == ("x", True)
        assert _run_matcher(StopStringMatcher(stops), ["xbc"]) == ("x", True)
    matcher = StopStringMatcher(["bc", "ab"])
    matcher.feed("xabc")
    assert matcher.matched == "ab"


def test_stop_inside_a_longer_stop():
    # "bc" completes first, but "abcd" would start earlier: wait until the text decides.
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("zabc") == ("z", False)
    assert matcher.feed("x") == ("a", True)
    assert matcher.matched == "bc"
    matcher = StopStringMatcher(["abcd", "bc"])
    assert _run_matcher(matcher, ["zabc", "d"]) == ("z", True)
    assert matcher.matched == "abcd"


def test_same_start_shortest_wins():
    matcher = StopStringMatcher(["abc", "ab"], include_stop_str_in_output=True)
    assert matcher.feed("xabc") == ("xab", True)
    assert matcher.matched == "ab"


def test_include_stop_str_in_output():
    matcher = StopStringMatcher(["</s>"], include_stop_str_in_output=True)
    assert _run_matcher(matcher, ["hello </", "s> tail"]) == ("hello </s>", True)


def test_finish_releases_held_back_tail():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello STO") == ("hello ", False)
    assert matcher.finish() == "STO"
    assert matcher.matched is None
    with pytest.raises(RuntimeError, match="after finish"):
        matcher.feed("x")


def test_finish_applies_a_stop_still_undecided():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("abc") == ("", False)
    assert matcher.finish() == "a"
    assert matcher.matched == "bc"


def test_no_stops_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.finish() == ""


@pytest.mark.parametrize("stops", ["STOP", [""], ["ok", 3], None])
def test_invalid_stops(stops):
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(stops)


def test_feed_rejects_non_string():
    with pytest.raises(ValueError, match="string"):
        StopStringMatcher(["x"]).feed(b"x")


def test_detokenizer_and_stop_strings_together(tokenizer):
    text = "Hello café, 日本語 and 🙂!"
    rng = random.Random(3)
    for stop in ["日本", "🙂", "é, 日", "and"]:
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q: "))
        matcher = StopStringMatcher([stop])
        pieces = [detokenizer.add(token_id) for token_id in tokenizer.encode(text, add_special_tokens=False)]
        pieces.append(detokenizer.flush())
        expected = text[: text.index(stop)]
        assert _run_matcher(matcher, pieces) == (expected, True)
        assert _run_matcher(StopStringMatcher([stop]), _random_split(text, rng)) == (expected, True)
