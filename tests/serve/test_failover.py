"""A node killed mid-stream: its requests continue on another node serving the model, unseen by clients.

Two nodes serve the same model over a real Redis, one api server in front, short heartbeats. Greedy
streams (the official openai client) run on both; SIGKILL of one node moves its streams to the other,
which resumes each from its prompt and the tokens its client already has: every stream ends with the
tokens transformers would have made, its usage right. With every node of the model dead, a request
for it answers 503 with Retry-After (it is registered, not unknown); an unknown model stays 404.
"""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest
import yaml

from aegaeon.config import DEFAULT_SHM_DIR
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.memory.shm import remove_orphans
from aegaeon.serve.metadata import RedisStore
from tests.serve.redis_server import RedisServer
from tests.serve.serve_process import ServeProcess

MODEL = "llama"
STREAMS = 10
# Long enough that the streams outlive the kill and the node timeout below on a slow shared machine.
TOKENS = 240
PROMPTS = ([3, 1, 4, 1, 5], [2, 7, 1, 8])
LIVENESS = {"heartbeat_interval_s": 0.2, "node_timeout_s": 1.0, "no_node_retry_after_s": 2.0}
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
# Streams started before the kill: enough tokens that the killed node held some of them mid-stream.
STARTED_TOKENS = 8
STREAM_TIMEOUT_S = 120.0
POLL_S = 0.05


def serve_node(model_dir, redis_url, profile_path, config_path) -> ServeProcess:
    return ServeProcess(
        f"{MODEL}={model_dir}",
        "--role", "node",
        "--redis-url", redis_url,
        "--profiles", str(profile_path),
        "--config", str(config_path),
    )  # fmt: skip


class Stream(threading.Thread):
    """One streaming completion read to its end: its text, usage, and the node that started it."""

    def __init__(self, client: openai.OpenAI, prompt: list[int]):
        super().__init__(daemon=True)
        self.client, self.prompt = client, prompt
        self.request_id: str | None = None
        self.text, self.tokens = "", 0
        self.usage = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.completions.create(
                model=MODEL,
                prompt=self.prompt,
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                logprobs=1,
                **GREEDY,
            )
            for chunk in stream:
                self.request_id = chunk.id
                if chunk.usage is not None:
                    self.usage = chunk.usage
                for choice in chunk.choices:
                    self.text += choice.text
                    self.tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


def test_a_killed_nodes_streams_finish_on_the_other_node_and_a_model_without_nodes_is_503(
    five_model_dirs, profile_path, hf_greedy, tmp_path
):
    config_path = tmp_path / "liveness.yaml"
    config_path.write_text(yaml.safe_dump(LIVENESS))
    model_dir = five_model_dirs[MODEL]
    tokenizer = Tokenizer.from_pretrained(model_dir)
    expected = {tuple(p): tokenizer.decode(hf_greedy(model_dir, p, TOKENS)) for p in PROMPTS}
    with (
        RedisServer() as redis_server,
        serve_node(model_dir, redis_server.url, profile_path, config_path) as node_a,
        serve_node(model_dir, redis_server.url, profile_path, config_path) as node_b,
    ):
        nodes = {}
        for node in (node_a, node_b):
            nodes[node.wait_for(r"node (node-\w+) takes requests at").group(1)] = node
        store = RedisStore(redis_server.url)
        api_args = (
            "--role",
            "api",
            "--redis-url",
            redis_server.url,
            "--port",
            "0",
            "--config",
            str(config_path),
        )
        try:
            with ServeProcess(*api_args) as api:
                url = api.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
                api.wait_for("Uvicorn running")
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

                streams = [Stream(client, list(PROMPTS[i % len(PROMPTS)])) for i in range(STREAMS)]
                for stream in streams:
                    stream.start()
                deadline = time.monotonic() + STREAM_TIMEOUT_S
                while not all(s.tokens >= STARTED_TOKENS or not s.is_alive() for s in streams):
                    assert time.monotonic() < deadline, "the streams did not start"
                    time.sleep(POLL_S)
                # Kill the node that holds the first stream, as a crash would (no drain, no goodbye).
                killed = store.get_request(streams[0].request_id).node_id
                on_killed = [
                    s.request_id for s in streams if store.get_request(s.request_id).node_id == killed
                ]
                nodes[killed].process.send_signal(signal.SIGKILL)
                for stream in streams:
                    stream.join(STREAM_TIMEOUT_S)

                for stream in streams:
                    assert stream.error is None, stream.error
                    assert stream.text == expected[tuple(stream.prompt)], stream.request_id
                    assert stream.tokens == TOKENS  # one logprob entry per token: none lost, none twice
                    assert stream.usage.completion_tokens == TOKENS
                    assert stream.usage.prompt_tokens == len(stream.prompt)
                moved = [line for line in api.lines if "moved from silent node" in line]
                assert len(moved) >= 1, "no stream was still running on the killed node when it died"
                assert all(any(rid in line for rid in on_killed) for line in moved)
                survivor = next(node_id for node_id in nodes if node_id != killed)
                assert all(store.get_request(rid).node_id == survivor for rid in on_killed)

                # The model's last node dies too: the model is registered, so it is unavailable, not unknown.
                nodes[survivor].process.send_signal(signal.SIGKILL)
                # The first refusals may be of requests sent to it in its last second; every one is a
                # 503 saying when to retry, until the api server knows the model has no node left.
                deadline = time.monotonic() + STREAM_TIMEOUT_S
                message = ""
                while "no live node serves it" not in message:
                    assert time.monotonic() < deadline, (
                        "requests for the model are not refused as unavailable"
                    )
                    try:
                        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1)
                    except openai.InternalServerError as error:
                        assert error.status_code == 503, error
                        retry_after = error.response.headers.get("retry-after")
                        assert retry_after == str(int(LIVENESS["no_node_retry_after_s"])), error
                        body = error.response.json()["error"]
                        assert body["type"] == "service_unavailable", body
                        message = body["message"]
                    time.sleep(POLL_S)
                with pytest.raises(openai.NotFoundError):
                    client.completions.create(model="no-such-model", prompt=PROMPTS[0], max_tokens=1)
        finally:
            store.close()
    # The killed nodes could not release their shared memory: do it for them, as the next node would.
    remove_orphans(DEFAULT_SHM_DIR)
