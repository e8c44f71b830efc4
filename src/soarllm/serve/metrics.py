"""Prometheus metrics for the server, with vLLM's names under a ``soar:`` prefix.

Request metrics (finish reasons, TTFT, TPOT, end-to-end latency, token counters) are observed by
the serving layer as outputs reach each request; engine gauges (running / waiting requests, KV
cache usage, prefix-cache hits, a MoE model's tokens per expert) are read from the engine's latest
stats when /metrics is scraped.
Per-API-key usage (requests, prompt and generated tokens, rate-limit refusals) is read from the
server's UsageLedger at scrape time, labelled by key name (never the key itself).
Every metric lives in a registry owned by one ServerMetrics, so two apps never share state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from soarllm.serve.usage import UsageLedger

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineStatsCollector(Collector):
    """Reads the engine's latest stats at scrape time."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str):
        self._get_stats = get_stats
        self._model = model_name

    def collect(self) -> Iterator[Any]:
        stats = self._get_stats()
        if stats is None:
            return
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._model], value)
            return c

        yield gauge("soar:num_requests_running", "Requests in the running batch.",
                    stats.num_running)
        yield gauge("soar:num_requests_waiting", "Requests waiting to be scheduled.",
                    stats.num_waiting)
        yield gauge("soar:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                    stats.kv_cache_usage)
        yield gauge("soar:num_kv_blocks_free", "Free KV-cache blocks.", stats.num_free_blocks)
        yield gauge("soar:num_kv_blocks_total", "KV-cache blocks in the pool.",
                    stats.num_total_blocks)
        yield counter("soar:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("soar:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)
        rate = stats.prefix_cache_hits / stats.prefix_cache_queries \
            if stats.prefix_cache_queries else 0.0
        yield gauge("soar:prefix_cache_hit_rate", "Prefix-cache hits / queries since start.", rate)
        yield counter("soar:num_preemptions", "Requests preempted since start.",
                      stats.num_preemptions)
        load = getattr(stats, "expert_load", None)
        if load:  # a Mixture-of-Experts model: how evenly the router spreads the tokens
            routed = CounterMetricFamily(
                "soar:moe_expert_routed_tokens",
                "Tokens routed to each expert (token x layer slots, summed over the MoE layers).",
                labels=labels + ["expert"])
            for expert, n in enumerate(map(sum, zip(*load))):
                routed.add_metric([self._model, str(expert)], n)
            yield routed
            yield gauge("soar:moe_expert_load_imbalance",
                        "Busiest expert's tokens / the mean, in the most unbalanced MoE layer "
                        "(1 = even).", _imbalance(load))
        replicas = getattr(stats, "replicas", None)
        if replicas:  # data parallel: the gauges above are totals; each replica's beside them
            for name, doc, field in (
                ("soar:replica_num_requests_running", "Running requests, by replica.",
                 "num_running"),
                ("soar:replica_num_requests_waiting", "Waiting requests, by replica.",
                 "num_waiting"),
                ("soar:replica_kv_cache_usage_perc", "KV-cache usage (0..1), by replica.",
                 "kv_cache_usage"),
                ("soar:replica_prefix_cache_hits", "Prefix-cache hit tokens, by replica.",
                 "prefix_cache_hits"),
            ):
                g = GaugeMetricFamily(name, doc, labels=labels + ["replica"])
                for i, rs in enumerate(replicas):
                    g.add_metric([self._model, str(i)], getattr(rs, field))
                yield g
            router = stats.router
            yield counter("soar:router_requests", "Requests the data-parallel router placed.",
                          router.requests)
            yield counter("soar:router_prefix_routed",
                          "Requests placed on the replica holding their longest known prefix.",
                          router.prefix_routed)
        spec = getattr(stats, "spec", None)
        if spec is not None:
            yield counter("soar:spec_decode_num_drafts",
                          "Verification steps of one request (speculative decoding).",
                          spec.num_drafts)
            yield counter("soar:spec_decode_num_draft_tokens", "Draft tokens verified.",
                          spec.num_draft_tokens)
            yield counter("soar:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                          spec.num_accepted_tokens)
            per_pos = CounterMetricFamily(
                "soar:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in the draft (0 = first).",
                labels=labels + ["position"])
            for pos, n in enumerate(spec.accepted_per_position):
                per_pos.add_metric([self._model, str(pos)], n)
            yield per_pos
            by_method = CounterMetricFamily(
                "soar:spec_decode_by_method",
                "Verification steps, draft tokens and accepted tokens, by proposer (method) and kind.",
                labels=labels + ["method", "kind"])
            for method, (steps, drafted, accepted) in sorted(spec.by_method.items()):
                for kind, value in (("steps", steps), ("draft_tokens", drafted),
                                    ("accepted_tokens", accepted)):
                    by_method.add_metric([self._model, method, kind], value)
            yield by_method
            yield gauge("soar:spec_decode_mean_acceptance_length",
                        "Tokens emitted per verification step since start (accepted + 1).",
                        spec.mean_acceptance_length)


def _imbalance(load: list[list[int]]) -> float:
    """max / mean tokens per expert, in the layer where it is largest (1.0 before any token)."""
    ratios = [max(row) * len(row) / sum(row) for row in load if sum(row)]
    return max(ratios, default=1.0)


class _UsageCollector(Collector):
    """Per-key counters from the UsageLedger, labelled ``key_name``."""

    def __init__(self, usage: UsageLedger):
        self._usage = usage

    def collect(self) -> Iterator[Any]:
        snapshot = self._usage.snapshot()
        families = {
            "requests": CounterMetricFamily(
                "soar:api_key_requests", "Requests that reached the engine, by API key name.",
                labels=["key_name"]),
            "prompt_tokens": CounterMetricFamily(
                "soar:api_key_prompt_tokens", "Prompt tokens of those requests, by API key name.",
                labels=["key_name"]),
            "completion_tokens": CounterMetricFamily(
                "soar:api_key_generation_tokens", "Tokens generated, by API key name.",
                labels=["key_name"]),
        }
        limited = CounterMetricFamily(
            "soar:api_key_rate_limited", "Requests refused with 429, by API key name and limit.",
            labels=["key_name", "limit"])
        for name, u in snapshot.items():
            for field_name, family in families.items():
                family.add_metric([name], getattr(u, field_name))
            for limit, n in u.rate_limited.items():
                limited.add_metric([name, limit], n)
        yield from families.values()
        yield limited


class ServerMetrics:
    def __init__(self, model_name: str, get_engine_stats: Callable[[], Any] | None = None,
                 usage: UsageLedger | None = None):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.request_success = Counter(
            "soar:request_success", "Finished requests by finish reason.",
            m + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(
            "soar:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter(
            "soar:generation_tokens", "Tokens generated.", m, registry=r)
        self.ttft = Histogram(
            "soar:time_to_first_token_seconds", "Time from arrival to the first output token.",
            m, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "soar:time_per_output_token_seconds",
            "Mean time between output tokens of a request, after the first.",
            m, buckets=TPOT_BUCKETS, registry=r)
        self.itl = Histogram(
            "soar:inter_token_latency_seconds", "Time between successive output tokens.",
            m, buckets=TPOT_BUCKETS, registry=r)
        # this model's series of the two, looked up once (observe_tokens runs per streamed chunk)
        self._tokens_of_model = self.generation_tokens.labels(model_name)
        self._itl_of_model = self.itl.labels(model_name)
        self.e2e = Histogram(
            "soar:e2e_request_latency_seconds", "Time from arrival to the last output.",
            m, buckets=E2E_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram(
            "soar:request_prompt_tokens", "Prompt length of finished requests.",
            m, buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(
            "soar:request_generation_tokens", "Tokens generated by finished requests.",
            m, buckets=TOKEN_BUCKETS, registry=r)
        self.http_requests = Counter(
            "soar:http_requests", "HTTP requests by route and status.",
            ["method", "path", "status"], registry=r)
        self.rejected = Counter(
            "soar:requests_rejected", "Requests refused before reaching the engine, by reason.",
            m + ["reason"], registry=r)
        if get_engine_stats is not None:
            r.register(_EngineStatsCollector(get_engine_stats, model_name))
        if usage is not None:
            r.register(_UsageCollector(usage))

    # -- observation helpers used by the serving layer -------------------------------------------

    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def observe_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        self._tokens_of_model.inc(num_tokens)
        if gap_s is not None and num_tokens > 0:
            per_token = gap_s / num_tokens
            for _ in range(min(num_tokens, 64)):
                self._itl_of_model.observe(per_token)

    def observe_first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)

    def observe_finished(self, reason: str, e2e_s: float, prompt_tokens: int,
                         generation_tokens: int, tpot_s: float | None) -> None:
        m = self.model_name
        self.request_success.labels(m, reason).inc()
        self.e2e.labels(m).observe(e2e_s)
        self.request_prompt_tokens.labels(m).observe(prompt_tokens)
        self.request_generation_tokens.labels(m).observe(generation_tokens)
        if tpot_s is not None:
            self.tpot.labels(m).observe(tpot_s)

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def observe_http(self, method: str, path: str, status: int) -> None:
        self.http_requests.labels(method, path, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
