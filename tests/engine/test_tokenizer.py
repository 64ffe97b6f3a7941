"""Tests for aegaeon.engine.tokenizer, on the demo byte-level BPE tokenizer and model directory."""

from __future__ import annotations

import json

import pytest

from aegaeon.demo import EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, build_tokenizer, write_demo_model
from aegaeon.engine.tokenizer import GENERATION_CONFIG_FILE, Tokenizer

TEXTS = [
    "hello world",
    "The old lighthouse stood at the edge.",
    "café",
    "日本語",
    "🙂",
    "naïve 日本語 🙂 café!",
    "",
]
USER_MESSAGE = {"role": "user", "content": "hi there"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-llama", "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_pretrained(model_dir)


def _with_generation_eos(model_dir, tmp_path, eos_token_id):
    """A copy of the model's tokenizer files whose generation_config.json has `eos_token_id`."""
    target = tmp_path / "model"
    target.mkdir()
    for source in model_dir.iterdir():
        if source.is_file() and not source.name.endswith(".safetensors"):
            (target / source.name).write_bytes(source.read_bytes())
    config = json.loads((target / GENERATION_CONFIG_FILE).read_text())
    config["eos_token_id"] = eos_token_id
    (target / GENERATION_CONFIG_FILE).write_text(json.dumps(config))
    return target


def test_from_pretrained_matches_demo_tokenizer(tokenizer):
    reference = build_tokenizer()
    assert tokenizer.vocab_size == len(reference)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(isinstance(token_id, int) for token_id in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    eos_id = tokenizer.hf_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_start_id = tokenizer.hf_tokenizer.convert_tokens_to_ids(IM_START_TOKEN)
    im_end_id = tokenizer.hf_tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    assert tokenizer.all_special_ids == {eos_id, im_start_id, im_end_id}
    ids = tokenizer.encode(f"hi{IM_END_TOKEN}")
    assert ids[-1] == im_end_id
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"hi{IM_END_TOKEN}"


def test_decode_does_not_clean_up_spaces(tokenizer):
    # The legacy clean-up would turn " ." into "." and break streaming == full decode.
    text = "one . two , three ?"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers_decode(tokenizer, skip_special_tokens):
    """Decoding through the Rust tokenizer directly gives what transformers' decode gives, on every
    prefix (what streaming decodes), partial UTF-8 characters, special tokens and unknown ids included."""
    hf = tokenizer.hf_tokenizer
    ids = tokenizer.encode(f"{IM_START_TOKEN}{' '.join(TEXTS)}{IM_END_TOKEN}") + [tokenizer.vocab_size + 5]
    for end in range(len(ids) + 1):
        expected = hf.decode(
            ids[:end], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens) == expected


def test_eos_from_tokenizer(tokenizer):
    eos_id = tokenizer.hf_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token_ids == frozenset({eos_id})


def test_eos_includes_generation_config_list(model_dir, tmp_path):
    im_end_id = build_tokenizer().convert_tokens_to_ids(IM_END_TOKEN)
    eos_id = build_tokenizer().eos_token_id
    tokenizer = Tokenizer.from_pretrained(_with_generation_eos(model_dir, tmp_path, [im_end_id, 7]))
    assert tokenizer.eos_token_ids == frozenset({eos_id, im_end_id, 7})


def test_eos_includes_generation_config_int(model_dir, tmp_path):
    im_end_id = build_tokenizer().convert_tokens_to_ids(IM_END_TOKEN)
    tokenizer = Tokenizer.from_pretrained(_with_generation_eos(model_dir, tmp_path, im_end_id))
    assert im_end_id in tokenizer.eos_token_ids
    assert build_tokenizer().eos_token_id in tokenizer.eos_token_ids


def test_malformed_generation_config_eos(model_dir, tmp_path):
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_pretrained(_with_generation_eos(model_dir, tmp_path, "<eos>"))


def test_init_merges_eos_ids():
    hf = build_tokenizer()
    tokenizer = Tokenizer(hf, [5, 6])
    assert tokenizer.eos_token_ids == frozenset({hf.eos_token_id, 5, 6})
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer(hf, [-1])
    with pytest.raises(ValueError, match="transformers tokenizer"):
        Tokenizer("not a tokenizer")


def test_chat_template_with_generation_prompt(tokenizer):
    ids = tokenizer.apply_chat_template([USER_MESSAGE])
    expected = f"{IM_START_TOKEN}user\nhi there{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected
    # The markers are single special tokens, not spelled out in bytes.
    im_start_id = tokenizer.hf_tokenizer.convert_tokens_to_ids(IM_START_TOKEN)
    assert ids[0] == im_start_id
    assert ids.count(im_start_id) == 2


def test_chat_template_without_generation_prompt(tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, USER_MESSAGE], add_generation_prompt=False
    )
    expected = (
        f"{IM_START_TOKEN}system\nBe brief.{IM_END_TOKEN}\n{IM_START_TOKEN}user\nhi there{IM_END_TOKEN}\n"
    )
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected


def test_chat_template_missing():
    hf = build_tokenizer()
    hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(hf).apply_chat_template([USER_MESSAGE])


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], "'role'"),
        ([{"role": "user"}], "'content'"),
        ([{"role": 1, "content": "hi"}], r"\['role'\] must be a string"),
        ([USER_MESSAGE, {"role": "user", "content": None}], r"messages\[1\]\['content'\] must be a string"),
    ],
)
def test_chat_template_malformed_messages(tokenizer, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tokenizer.apply_chat_template(messages)


def test_invalid_inputs(tokenizer):
    with pytest.raises(ValueError, match="string"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="non-negative"):
        tokenizer.decode([1, -3])
    with pytest.raises(ValueError, match="non-negative"):
        tokenizer.decode([True])


def test_token_text_and_tokens(tokenizer):
    ids = tokenizer.encode(" world", add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0].startswith("Ġ")  # byte-level BPE spells the space as Ġ
    assert "".join(tokenizer.token_text(token_id) for token_id in ids) == " world"
    eos_id = next(iter(tokenizer.eos_token_ids))
    assert tokenizer.token_text(eos_id) == EOS_TOKEN
    # A lone byte of a multi-byte character is shown as U+FFFD.
    assert "\ufffd" in tokenizer.token_text(tokenizer.encode("日", add_special_tokens=False)[0])
