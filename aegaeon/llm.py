"""The offline API, in the style of vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from aegaeon.config import EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.outputs import RequestOutput
from aegaeon.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from a model in this process, batching all prompts of a call together."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
    ):
        self.engine = LLMEngine(model, device=device, dtype=dtype, config=config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`; one SamplingParams for all, or one per prompt."""
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, sampling in zip(request_ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, sampling)
        except ValueError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """Generate the assistant's reply to one conversation, through the model's chat template."""
        return self.generate([self.tokenizer.apply_chat_template(messages)], params)[0]


def _is_token_list(prompts: object) -> bool:
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)
