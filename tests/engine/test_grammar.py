"""Structured outputs and prompt logprobs in the engine: masks batched with free rows, grammars that
survive preemption and replay, prompt logprobs equal to transformers' whatever the prefill chunking."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from aegaeon.config import EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.grammar import bitmask_words
from aegaeon.engine.kv_cache import kv_block_bytes
from aegaeon.engine.outputs import RequestOutput
from aegaeon.engine.postprocess import replay
from aegaeon.engine.sampler import Sampler, SamplingRow
from aegaeon.engine.sampling_params import GrammarSpec, SamplingParams
from aegaeon.errors import InvalidRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["a", "bb", "ccc"]},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "tag", "ok"],
    "additionalProperties": False,
}
JSON_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA), "response_format")
PROMPT_LENS = (5, 40, 70)
CHUNK_BUDGET = 24
SMALL_CACHE_BLOCKS = 10
LOGPROB_TOLERANCE = 1e-4
FIRST_ORDINARY_TOKEN = 3
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir(demo_model_dirs):
    return demo_model_dirs["llama"]


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    engine = LLMEngine(model_dir, progress=False)
    vocab = engine.model().arch.vocab_size
    rng = random.Random(1)
    return [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(n)] for n in PROMPT_LENS]


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Each request's whole output; `engine.preempted` is set when some sequence was preempted."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, RequestOutput] = {}
    engine.preempted = False
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, RequestOutput(delta.request_id, None, [])).add(delta)
        # Only preemption puts a sequence that has generated tokens back in the waiting queue.
        engine.preempted |= any(seq.output_token_ids for seq in engine.model().batcher.waiting)
    return outputs


# A long free request beside the others: with the small cache, someone is preempted.
FREE = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def engines(model_dir) -> dict[str, LLMEngine]:
    arch = LLMEngine(model_dir, progress=False).model().arch
    small = SMALL_CACHE_BLOCKS * kv_block_bytes(arch, torch.float32)
    return {
        "whole": LLMEngine(model_dir, progress=False),
        "chunked-preempting": LLMEngine(
            model_dir,
            config=EngineConfig(max_num_batched_tokens=CHUNK_BUDGET, kv_cache_bytes=small),
            progress=False,
        ),
    }


def test_prompt_logprobs_equal_transformers_whole_or_in_chunks(model_dir, prompts, hf_causal_lm):
    hf = hf_causal_lm(model_dir)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=3)
    for name, engine in engines(model_dir).items():
        requests = {f"p{i}": (p, params) for i, p in enumerate(prompts)} | {"free": (prompts[-1], FREE)}
        outputs = run(engine, requests)
        assert engine.preempted == (name == "chunked-preempting")
        for i, prompt in enumerate(prompts):
            got = outputs[f"p{i}"].prompt_logprobs
            assert got is not None and len(got) == len(prompt) and got[0] is None, name
            with torch.no_grad():
                expected = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)
            values = torch.tensor([entry.logprob for entry in got[1:]])
            target = expected.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
            assert torch.allclose(values, target, atol=LOGPROB_TOLERANCE), (name, i)
            assert [entry.token_id for entry in got[1:]] == prompt[1:]
            best = expected.topk(3, dim=-1)
            assert [[t for t, _ in entry.top] for entry in got[1:]] == best.indices.tolist(), (name, i)


def test_grammar_holds_through_chunking_and_preemption(model_dir, prompts):
    engine = engines(model_dir)["chunked-preempting"]
    requests = {
        f"g{seed}": (
            prompts[seed],
            SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, grammar=JSON_SPEC),
        )
        for seed in range(len(prompts))
    } | {"free": (prompts[-1], FREE)}
    outputs = run(engine, requests)
    assert engine.preempted
    for seed in range(len(prompts)):
        output = outputs[f"g{seed}"]
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), SCHEMA)


def test_replayed_tokens_put_the_grammar_where_it_was(model_dir, prompts):
    """A sequence rebuilt from its tokens (a handoff) continues its grammar from the same place."""
    engine = LLMEngine(model_dir, progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, grammar=JSON_SPEC)
    tokens = run(engine, {"r": (prompts[0], params)})["r"].token_ids
    served = engine.model()
    for cut in (0, len(tokens) // 2, len(tokens) - 1):
        seq = engine._new_sequence(served, "x", 0, prompts[0], params, MAX_TOKENS)
        replay(seq, tokens[:cut], served.eos_token_ids)
        mask = torch.zeros(1, bitmask_words(served.arch.vocab_size), dtype=torch.int32)
        seq.grammar.fill_mask(mask[0])
        word, bit = divmod(tokens[cut], 32)
        assert (int(mask[0, word]) >> bit) & 1, f"token {cut} is not allowed after replaying {cut} tokens"


def test_constrained_rows_leave_free_rows_alone():
    """A grammar's mask applies to its own row: the free rows of the batch sample as they would alone."""
    from aegaeon.demo import build_tokenizer
    from aegaeon.engine.grammar import GrammarCompiler
    from aegaeon.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(build_tokenizer())
    vocab = tokenizer.vocab_size
    matcher = GrammarCompiler(tokenizer, vocab).matcher(
        GrammarSpec("choice", '["yes", "no"]', "guided_choice")
    )
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    greedy = SamplingParams(temperature=0)
    seeded = SamplingParams(temperature=1.0, seed=3)
    rows = [
        SamplingRow(greedy),
        SamplingRow(greedy, grammar=matcher),
        SamplingRow(seeded, generator=torch.Generator().manual_seed(3)),
    ]
    out = Sampler()(logits, rows).token_ids
    alone = Sampler()(
        logits[[0, 2]], [SamplingRow(greedy), SamplingRow(seeded, generator=torch.Generator().manual_seed(3))]
    )
    assert [out[0], out[2]] == alone.token_ids
    assert tokenizer.decode([out[1]]) in ("y", "yes", "n", "no") or "yes".startswith(
        tokenizer.decode([out[1]])
    )


def test_min_tokens_and_logit_bias_in_the_sampler():
    vocab = 50
    logits = torch.zeros(2, vocab)
    logits[:, 7] = 5.0  # eos would win
    rows = [
        SamplingRow(SamplingParams(temperature=0, min_tokens=2), banned_token_ids=[7]),
        SamplingRow(SamplingParams(temperature=0, logit_bias={11: 10.0})),
    ]
    assert Sampler()(logits, rows).token_ids[0] != 7
    assert Sampler()(logits, rows).token_ids[1] == 11


def test_a_bad_grammar_is_refused_before_the_request_starts(model_dir, prompts):
    engine = LLMEngine(model_dir, progress=False)
    with pytest.raises(InvalidRequest) as caught:
        engine.add_request(
            "bad", prompts[0], SamplingParams(grammar=GrammarSpec("regex", "a(", "guided_regex"))
        )
    assert caught.value.param == "guided_regex"
    assert not engine.has_unfinished_requests()


def test_a_matcher_fed_a_token_its_grammar_forbids_allows_only_eos():
    from aegaeon.demo import build_tokenizer
    from aegaeon.engine.grammar import GrammarCompiler, allowed_tokens
    from aegaeon.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(build_tokenizer())
    vocab = tokenizer.vocab_size
    matcher = GrammarCompiler(tokenizer, vocab).matcher(GrammarSpec("choice", '["yes"]', "guided_choice"))
    [forbidden] = tokenizer.encode("x")
    matcher.accept(forbidden)
    mask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
    matcher.fill_mask(mask[0])
    assert allowed_tokens(mask, vocab)[0].nonzero().flatten().tolist() == sorted(tokenizer.eos_token_ids)[:1]
