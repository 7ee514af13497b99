"""Prometheus metrics of a running server, with vLLM's names, so dashboards made for vLLM
read paged-jax unchanged.

Everything comes from what the engine already records: gauges and the scheduler's counters
from the engine loop's snapshot (taken between steps), latencies from each request's
RequestMetrics (the engine's own timestamps), token counts from the outputs. Nothing here
times a step a second time.

Inter-token latency: a multi-step decode loop returns several tokens of a request at once, all
stamped with the step's end. Each of those k tokens is observed at 1/k of the gap since the
request's previous tokens (the rate the client actually saw them at), so the histogram's sum is
the request's decode time and its count the tokens after the first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from paged_jax.engine.client import EngineLoad
from paged_jax.outputs import RequestOutput

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]


@dataclass
class _Progress:
    """What a request had produced at its previous output."""

    num_tokens: dict[int, int] = field(default_factory=dict)  # completion index -> tokens
    last_token_time: float | None = None


class ServingMetrics:
    """The server's registry. `on_output` and `on_finish_early` are the AsyncLLMEngine's hooks
    (called in the engine thread); `render()` is the /metrics body."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineLoad]):
        prometheus_client.disable_created_metrics()  # as vLLM: no `_created` series beside each counter
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              buckets=TTFT_BUCKETS, **labels).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens in seconds.",
                             buckets=ITL_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End to end request latency in seconds.",
                             buckets=REQUEST_BUCKETS, **labels).labels(model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Time a request waited before it was first scheduled, in seconds.",
                               buckets=REQUEST_BUCKETS, **labels).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     **labels).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         **labels).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Count of finished requests by finish reason.",
                                       labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(model_name, snapshot))
        self._progress: dict[str, _Progress] = {}
        self._lock = threading.Lock()

    def on_output(self, output: RequestOutput) -> None:
        with self._lock:
            progress = self._progress.setdefault(output.request_id, _Progress())
            metrics = output.metrics
            new = {c.index: len(c.token_ids) - progress.num_tokens.get(c.index, 0) for c in output.outputs}
            num_new = sum(max(0, n) for n in new.values())
            if num_new:
                self.generation_tokens.inc(num_new)
                if progress.last_token_time is None:  # the first token(s): the prompt is computed
                    self.prompt_tokens.inc(len(output.prompt_token_ids))
                    if metrics.first_token_time is not None:
                        self.ttft.observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
                    num_new = max(new.values()) - 1  # the rest of this output's tokens came with the first
                    gap_from = metrics.first_token_time
                else:
                    num_new = max(new.values())
                    gap_from = progress.last_token_time
                if num_new > 0 and metrics.last_token_time is not None and gap_from is not None:
                    per_token = max(0.0, metrics.last_token_time - gap_from) / num_new
                    for _ in range(num_new):
                        self.itl.observe(per_token)
                progress.last_token_time = metrics.last_token_time
                progress.num_tokens = {c.index: len(c.token_ids) for c in output.outputs}
            if output.finished:
                del self._progress[output.request_id]
                if metrics.finished_time is not None:
                    self.e2e.observe(max(0.0, metrics.finished_time - metrics.arrival_time))
                if metrics.first_scheduled_time is not None:
                    self.queue.observe(max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
                reason = output.outputs[0].finish_reason if output.outputs else "error"
                self.request_success.labels(self.model_name, reason or "stop").inc()

    def on_finish_early(self, request_id: str, reason: str) -> None:
        """A request aborted (the client left) or failed (its step raised)."""
        with self._lock:
            self._progress.pop(request_id, None)
            self.request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and the scheduler's own counters, read from the engine loop's latest snapshot at
    scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineLoad]):
        prometheus_client.disable_created_metrics()  # as vLLM: no `_created` series beside each counter
        self.model_name = model_name
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the names are vLLM's and cannot clash with ours

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        for kind, name, doc, value in [
            (GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
             s.num_running),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             s.num_waiting),
            (GaugeMetricFamily, "vllm:num_requests_swapped", "Number of requests swapped to CPU.", s.num_swapped),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             s.kv_cache_usage),
            (CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", s.num_prompt_tokens),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.num_cached_prompt_tokens),
            (CounterMetricFamily, "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
             s.num_spec_drafts),
            (CounterMetricFamily, "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
             s.num_spec_draft_tokens),
            (CounterMetricFamily, "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
             s.num_spec_accepted_tokens),
        ]:
            family = kind(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=["model_name", "position"])
        for position, value in enumerate(s.spec_accepted_per_pos):
            per_pos.add_metric([self.model_name, str(position)], value)
        yield per_pos
