"""aegaeon: serve many LLMs on a few accelerators by switching models at token granularity.

`LLM` and `SamplingParams` load lazily so that importing a torch-free part of the package
(the scheduler, the simulator) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aegaeon.engine.sampling_params import SamplingParams
    from aegaeon.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from aegaeon.llm import LLM

        return LLM
    if name == "SamplingParams":
        from aegaeon.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'aegaeon' has no attribute {name!r}")
