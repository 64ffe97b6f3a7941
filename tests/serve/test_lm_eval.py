"""lm-evaluation-harness scores a multiple-choice task through `aegaeon serve` as through transformers.

The harness's `local-completions` backend sends token-id prompts, several per request, with
`echo`, `logprobs: 1` and `max_tokens: 1`, and sums the echoed logprobs of each answer's tokens;
its `hf` backend runs the same model in transformers. Both must agree item by item.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.serve.serve_process import ServeProcess

try:
    import lm_eval
    from lm_eval.tasks import TaskManager
except ImportError as error:  # in the dev extras; a machine that could not install it says why
    pytest.skip(f"lm-eval cannot be imported ({error}); pip install -e '.[dev]'", allow_module_level=True)

TASK = "aegaeon_demo_mc"
# Each question's context, its choices and the index of the right one: short, so the test stays fast.
ITEMS = [
    ("The river runs from the mountains to the", ["sea", "city", "market", "bread"], 0),
    ("In the morning the market opened", ["early", "late", "never"], 0),
    ("One plus one is", ["two", "six", "four", "seven"], 0),
    ("The keeper climbed the spiral stairs to light the", ["lamp", "bread", "river"], 0),
    ("She made a cup of", ["tea", "stone", "water"], 0),
    ("A prime number has exactly two", ["divisors", "towers", "apples"], 0),
]
# Several prompts per request, as the harness sends them with a batch size above one.
BATCH_SIZE = 4
LOGLIKELIHOOD_TOLERANCE = 1e-4
SERVE_TIMEOUT_S = 120


def write_task(directory: pathlib.Path) -> pathlib.Path:
    """A jsonl of the items and a task YAML pointing at it; the directory to include."""
    data = directory / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS)
    )
    # YAML is a superset of JSON; `datasets` caches the parsed file under cache_dir, kept in tmp.
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (directory / f"{TASK}.yaml").write_text(json.dumps(task, indent=2))
    return directory


def evaluate(model: str, model_args: dict, task_dir: pathlib.Path) -> dict:
    """The harness's results for the task, with the logged samples."""
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        num_fewshot=0,
        batch_size=BATCH_SIZE,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def loglikelihoods(results: dict) -> dict[int, list[float]]:
    """Each item's loglikelihood of each choice, by item."""
    return {
        sample["doc_id"]: [ll for ll, _greedy in sample["filtered_resps"]]
        for sample in results["samples"][TASK]
    }


def test_lm_eval_scores_through_the_server_as_through_transformers(demo_model_dirs, profile_path, tmp_path):
    model_dir = demo_model_dirs["llama"]
    task_dir = write_task(tmp_path)
    reference = evaluate("hf", {"pretrained": str(model_dir), "device": "cpu", "dtype": "float32"}, task_dir)

    with ServeProcess(
        f"demo={model_dir}", "--port", "0", "--profiles", str(profile_path), "--dtype", "float32"
    ) as server:
        url = server.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
        server.wait_for("Uvicorn running")
        served = evaluate(
            "local-completions",
            {
                "model": "demo",
                "base_url": f"{url}/v1/completions",
                "tokenizer": str(model_dir),
                "tokenizer_backend": "huggingface",
                "timeout": SERVE_TIMEOUT_S,
            },
            task_dir,
        )

    expected, got = loglikelihoods(reference), loglikelihoods(served)
    assert sorted(got) == sorted(expected) == list(range(len(ITEMS)))
    for doc_id, lls in expected.items():
        assert len(lls) == len(ITEMS[doc_id][1])
        assert got[doc_id] == pytest.approx(lls, abs=LOGLIKELIHOOD_TOLERANCE), f"item {doc_id}"
    # The choices are told apart: a server echoing constant logprobs could not pass the comparison above.
    assert len({round(ll, 3) for lls in expected.values() for ll in lls}) > len(ITEMS)
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"][TASK][metric] == reference["results"][TASK][metric], metric
