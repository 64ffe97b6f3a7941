"""The baseline aegaeon is measured against: request-level switching on one device.

What request-level auto-scaling (ServerlessLLM-style) does with one device: the loaded model
serves its requests, new ones of the same model joining its batch, until it has none left; only
then is another model loaded: the model of the oldest waiting request. It uses the same engine, the
same switch machinery and the same prefill queue as the token-level instance, so a side-by-side run
isolates the scheduling policy.
"""

from __future__ import annotations

from aegaeon.instance.instance import Instance
from aegaeon.scheduler.timeline import EventKind


class RequestLevelInstance(Instance):
    """Runs one model's requests to completion before switching to another."""

    # A baseline for benchmarks: if its process dies, its requests fail rather than resume.
    recoverable = False

    def _work(self) -> bool:
        self._adopt_handoffs()  # aborts
        return self._serve_oldest_model()

    def _take_queued(self, model: str | None) -> list:
        """Pop the queued requests, in order, of `model` (None: of the oldest request's model)."""
        taken = []
        with self.node.lock:
            while (model is None or self.prefill_queue.peek_model() == model) and (
                task := self.prefill_queue.pop(self.node.now())
            ):
                model = task.request.model
                self.prefill_queue.complete()
                taken.append(task.request)
        return taken

    def _serve_oldest_model(self) -> bool:
        requests = self._take_queued(None)
        if not requests:
            return False
        model = requests[0].model
        self._drive(self.turns.switch(model))
        start, steps = self.node.now(), 0
        while requests or self.engine.has_unfinished_requests(model):
            for request in requests:
                live = self.node.live.get(request.request_id)
                if live is not None:
                    self.engine.add_request(request.request_id, live.prompt_token_ids, live.params, model)
            if self.engine.has_unfinished_requests(model):
                self._deliver(self.engine.step())
                steps += 1
            self._adopt_handoffs()
            requests = self._take_queued(model)  # newcomers of the loaded model join its batch
        self.timeline.record(EventKind.DECODE_TURN, model, start, self.node.now(), tokens=steps)
        return True
