"""The offline API, in the style of vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`.

With several models, `LLM(models={"a": PATH_A, "b": PATH_B})` runs them on a node whose instances
switch between them at token granularity, and `generate(..., model="a")` (or one model per prompt)
picks which model answers. `tensor_parallel_size=N` splits each model over N rank processes
(one device each; see docs/engine.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from aegaeon.config import EngineConfig, NodeConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.outputs import RequestDelta, RequestOutput
from aegaeon.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from one model (an engine in this process) or several (a node of instances)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        models: Mapping[str, str | Path] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
        node_config: NodeConfig | None = None,
        tensor_parallel_size: int = 1,
    ):
        if (model is None) == (models is None):
            raise ValueError("pass either model=PATH or models={name: PATH, ...}")
        self._ids = itertools.count()
        self.engine: LLMEngine | None = None
        self.node = None
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if model is not None and tensor_parallel_size > 1:
            from aegaeon.engine.parallel.lockstep import TensorParallelEngine

            self.engine = TensorParallelEngine(
                model, tensor_parallel_size=tensor_parallel_size, device=device, dtype=dtype, config=config
            )
            return
        if model is not None:
            self.engine = LLMEngine(model, device=device, dtype=dtype, config=config)
            return
        from aegaeon.instance.node import Node

        base = node_config or NodeConfig()
        overrides = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        if tensor_parallel_size > 1:
            overrides["tensor_parallel_size"] = tensor_parallel_size
        if config is not None:
            overrides["engine"] = config
        self.node = Node(models, dataclasses.replace(base, **overrides))

    @property
    def tokenizer(self):
        if self.engine is None:
            raise ValueError("several models are served: use tokenizer_of(name)")
        return self.engine.tokenizer

    def tokenizer_of(self, model: str):
        if self.engine is not None:
            return self.engine.models[model].tokenizer
        return self.node.tokenizers[model]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        model: str | Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`; one SamplingParams for all, or one per prompt.

        `model` names the model of every prompt, or gives one per prompt (several models only).
        """
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if self.node is not None:
            models = [model] * len(prompts) if model is None or isinstance(model, str) else list(model)
            if len(models) != len(prompts):
                raise ValueError(f"got {len(models)} models for {len(prompts)} prompts")
            return self._generate_on_node(prompts, params, models)
        if model is not None:
            raise ValueError("model= picks among several models; this LLM serves one")
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        outputs: dict[str, RequestOutput] = {}
        try:
            for request_id, prompt, sampling in zip(request_ids, prompts, params, strict=True):
                prepared = self.engine.add_request(request_id, prompt, sampling)
                outputs[request_id] = RequestOutput(request_id, prepared.text, prepared.token_ids)
        except ValueError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                outputs[delta.request_id].add(delta)
        return [outputs[request_id] for request_id in request_ids]

    def _generate_on_node(
        self, prompts: list[Prompt], params: list[SamplingParams], models: list[str | None]
    ) -> list[RequestOutput]:
        errors: list[BaseException] = []
        all_done = threading.Event()
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        # Check every prompt before queueing any, so a bad one leaves nothing running.
        prepared = [
            self.node.prepare_prompt(prompt, sampling, name)
            for prompt, sampling, name in zip(prompts, params, models, strict=True)
        ]
        outputs = {
            request_id: RequestOutput(request_id, ready.text, ready.token_ids)
            for request_id, ready in zip(request_ids, prepared, strict=True)
        }
        finished: set[str] = set()

        def on_output(delta: RequestDelta) -> None:
            outputs[delta.request_id].add(delta)
            if delta.finished:
                finished.add(delta.request_id)
                if len(finished) + len(errors) == len(request_ids):
                    all_done.set()

        def on_error(error: BaseException) -> None:
            errors.append(error)
            all_done.set()

        for request_id, prompt, sampling, name in zip(request_ids, prompts, params, models, strict=True):
            self.node.submit(prompt, sampling, name, on_output, on_error, request_id=request_id)
        all_done.wait()
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}") from errors[0]
        return [outputs[request_id] for request_id in request_ids]

    def chat(
        self, messages: list[dict], params: SamplingParams | None = None, model: str | None = None
    ) -> RequestOutput:
        """Generate the assistant's reply to one conversation, through the model's chat template."""
        tokenizer = self.tokenizer if model is None else self.tokenizer_of(model)
        return self.generate([tokenizer.apply_chat_template(messages)], params, model)[0]

    def close(self) -> None:
        """Stop the node's instances and release its shared memory, or a single model's other ranks."""
        if self.node is not None:
            self.node.close()
        elif hasattr(self.engine, "close"):
            self.engine.close()


def _is_token_list(prompts: object) -> bool:
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)
