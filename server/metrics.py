"""GET /metrics: Prometheus' text format (prometheus-client), names prefixed
`fermi_`: requests by route and status and their duration (from the request
log), tokens and latencies per model (from each answer's Done, HTTP and gRPC
alike), and what the engines hold now (read at each scrape: queue, slots, KV
cache, load time). Behind the API key unless `--metrics-public`."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

from fermi.serving import Done

# The routes a request is counted under (others: "other", so a scanner cannot grow the series).
ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/models", "/api/chat", "/api/generate",
          "/api/tags", "/api/show", "/api/ps", "/api/pull", "/api/delete", "/api/version", "/health", "/live", "/ready",
          "/metrics")
MEDIA_TYPE = CONTENT_TYPE_LATEST.split("; charset")[0]  # (the charset is Litestar's to add)
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
disable_created_metrics()  # (process-wide) no *_created series beside every counter


class Metrics:
    def __init__(self, fleet):
        self.fleet = fleet
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fermi_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.duration = Histogram("fermi_request_duration_seconds", "HTTP request duration, headers to last byte",
                                  ["route"], buckets=DURATION, registry=r)
        self.prompt = Counter("fermi_prompt_tokens", "prompt tokens of the answers", ["model"], registry=r)
        self.cached = Counter("fermi_cached_tokens", "prompt tokens reused from the KV cache", ["model"], registry=r)
        self.generated = Counter("fermi_generated_tokens", "tokens generated", ["model"], registry=r)
        self.answers = Counter("fermi_answers", "answers ended, by finish reason", ["model", "finish_reason"],
                               registry=r)
        self.ttft = Histogram("fermi_time_to_first_token_seconds", "submission to the first token", ["model"],
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("fermi_inter_token_latency_seconds", "the mean time between an answer's tokens",
                             ["model"], buckets=LATENCY, registry=r)
        self.totals: dict[str, list[int]] = {}  # model -> [prompt, cached] tokens, for the hit ratio
        r.register(_Engines(fleet, self.totals))

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def done(self, model: str, d: Done) -> None:
        t = self.totals.setdefault(model, [0, 0])
        t[0] += d.prompt_tokens
        t[1] += d.cached_tokens
        self.prompt.labels(model).inc(d.prompt_tokens)
        self.cached.labels(model).inc(d.cached_tokens)
        self.generated.labels(model).inc(d.completion_tokens)
        self.answers.labels(model, d.finish_reason).inc()
        if d.completion_tokens:
            self.ttft.labels(model).observe(d.ttft)
        if d.decode_tps > 0:
            self.itl.labels(model).observe(1.0 / d.decode_tps)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Engines:
    """What each loaded model's engine holds at the time of the scrape."""

    def __init__(self, fleet, totals: dict):
        self.fleet, self.totals = fleet, totals

    def describe(self):
        return []

    def collect(self):
        families = {
            "queue": GaugeMetricFamily("fermi_queue_depth", "requests waiting for a slot", labels=["model"]),
            "active": GaugeMetricFamily("fermi_active_slots", "slots generating an answer", labels=["model"]),
            "slots": GaugeMetricFamily("fermi_slots", "slots (sequences decoded together)", labels=["model"]),
            "kv": GaugeMetricFamily("fermi_kv_cache_tokens", "tokens held in the KV cache", labels=["model"]),
            "kv_max": GaugeMetricFamily("fermi_kv_cache_capacity_tokens", "tokens the KV cache can hold",
                                        labels=["model"]),
            "load": GaugeMetricFamily("fermi_model_load_seconds", "how long the model took to load", labels=["model"]),
            "hits": GaugeMetricFamily("fermi_prefix_cache_hit_ratio", "prompt tokens reused from the KV cache, of "
                                      "all prompt tokens since the start", labels=["model"]),
        }
        for name, (prompt, cached) in self.totals.items():
            families["hits"].add_metric([name], cached / prompt if prompt else 0.0)
        for s in self.fleet.servings():
            core = s.scheduler
            if s.engine is None or core is None:
                continue
            name = s.engine.name
            families["queue"].add_metric([name], core.queued())
            families["active"].add_metric([name], core.active())
            families["slots"].add_metric([name], len(core.slots))
            families["kv"].add_metric([name], float(sum(int(n) for n in core.cache.lengths)))
            families["kv_max"].add_metric([name], len(core.slots) * core.max_len)
            if s.load_seconds is not None:
                families["load"].add_metric([name], s.load_seconds)
        yield from families.values()


@get("/metrics", summary="Metrics", description="Prometheus text format.", tags=["health"], media_type=MEDIA_TYPE,
     sync_to_thread=False)
def metrics_route(request_metrics: "Metrics") -> Response:
    return Response(request_metrics.text(), media_type=MEDIA_TYPE)
