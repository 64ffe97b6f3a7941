"""Logs an operator can feed to a pipeline: one JSON object per line, each request's end with its id."""

from __future__ import annotations

import json
import logging

import httpx

from aegaeon.logs import JsonFormatter
from tests.serve.serve_process import ServeProcess

SECRET_PROMPT = "my-secret-prompt-text"


def test_json_lines_carry_the_extra_fields():
    record = logging.makeLogRecord(
        {
            "name": "aegaeon.x",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "hello %s",
            "args": ("you",),
        }
    )
    record.request_id = "cmpl-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["level"] == "info" and line["logger"] == "aegaeon.x"
    assert line["request_id"] == "cmpl-1" and line["time"].endswith("Z")


def test_serve_logs_each_request_as_json_with_its_id_and_never_its_prompt(demo_model_dirs, profile_path):
    model = f"llama={demo_model_dirs['llama']}"
    with ServeProcess(
        model, "--port", "0", "--profiles", str(profile_path), "--log-format", "json"
    ) as server:
        url = server.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
        server.wait_for("Uvicorn running")
        body = {"model": "llama", "prompt": SECRET_PROMPT, "max_tokens": 4}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        line = server.wait_for(rf'"request_id": "{answer["id"]}"').string
        entry = json.loads(line)
        assert entry["outcome"] == "finished" and entry["model"] == "llama" and entry["output_tokens"] == 4
        server.stop()
    logged = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert any(entry["logger"].startswith("uvicorn") for entry in logged)  # uvicorn's lines too
    assert not any(SECRET_PROMPT in line for line in server.lines)
