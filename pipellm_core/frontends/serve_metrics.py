"""`pipellm serve --metrics`: Prometheus metrics of the server, with prometheus-client.

Gauges are read from the engine loop when scraped; counters are counted as requests end. Each
server has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.responses import Response


class ServeMetrics:
    def __init__(self, state):
        self.state = state
        self.registry = r = CollectorRegistry()
        loop = lambda: state.loop  # noqa: E731 (the loop exists only once the model is loaded)
        Gauge("pipellm_requests_running", "requests holding a slot in the running batch",
              registry=r).set_function(lambda: loop().running if loop() else 0)
        Gauge("pipellm_requests_waiting", "requests waiting for a slot",
              registry=r).set_function(lambda: loop().waiting if loop() else 0)
        Gauge("pipellm_slots", "slots (sequences decoded together at most)",
              registry=r).set_function(lambda: loop().batcher.max_batch if loop() else 0)
        Gauge("pipellm_decode_tokens_per_second", "tokens per second of all sequences in the decode "
              "steps of the last 10 seconds", registry=r).set_function(lambda: loop().decode_tok_s() if loop() else 0.0)
        Gauge("pipellm_model_ready", "1 once the model is loaded",
              registry=r).set_function(lambda: 1.0 if state.ready.is_set() else 0.0)
        self.prompt_tokens = Counter("pipellm_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("pipellm_generated_tokens", "tokens generated for finished requests",
                                        registry=r)
        self.requests = Counter("pipellm_requests", "requests by outcome", ["outcome"], registry=r)

    def accepted(self) -> None:
        self.requests.labels("accepted").inc()

    def refused(self, status: int) -> None:
        self.requests.labels(f"refused_{status}").inc()

    def disconnected(self) -> None:
        self.requests.labels("disconnected").inc()

    def finished(self, job) -> None:
        self.requests.labels("finished").inc()
        self.prompt_tokens.inc(len(job.request.prompt_tokens))
        self.generated_tokens.inc(len(job.request.generated))

    async def endpoint(self, request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
