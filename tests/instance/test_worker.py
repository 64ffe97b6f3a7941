"""What an instance process sends its node per engine step stays small however long the generation is."""

from __future__ import annotations

import pickle

from aegaeon.config import EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.worker import EngineService, Reply

TOKENS = 1000
PROMPT = [5, 9, 13, 2]
# The finish reason the last step carries and the first does not.
FINISH_BYTES = len(pickle.dumps("length"))


def one_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on what one more token adds to a message: its id and its text.

    A text delta may also release a character held back from the token before (up to 4 UTF-8 bytes).
    """
    longest = max(len(tokenizer.decode([t]).encode()) for t in range(tokenizer.vocab_size))
    return len(pickle.dumps(tokenizer.vocab_size)) + longest + 4


def test_a_step_reply_does_not_grow_with_the_generation(make_demo_model):
    model_dir = make_demo_model("llama", max_position_embeddings=TOKENS + 2 * len(PROMPT))
    engine = LLMEngine(model_dir, config=EngineConfig(max_model_len=TOKENS + len(PROMPT)), progress=False)
    service = EngineService(engine, kv_pool=None)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    service.add_request("long", PROMPT, params, engine.model().name)
    sizes, tokens = [], 0
    while service.has_unfinished_requests():
        deltas = service.step()
        tokens += sum(len(seq.token_ids) for delta in deltas for seq in delta.outputs)
        # What the worker sends back for a `step` call (zmq's send_pyobj pickles with the default protocol).
        sizes.append(len(pickle.dumps(Reply(value=deltas), pickle.DEFAULT_PROTOCOL)))
    assert tokens == TOKENS == len(sizes)
    assert sizes[-1] <= sizes[0] + FINISH_BYTES + one_token_bytes(engine.tokenizer), sizes[:: TOKENS // 10]
