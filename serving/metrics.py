"""Prometheus metrics of the server (prometheus-client), each in the server's own registry.

Exposed on `--metrics-port` (off by default: 0; 9090 is the usual choice) at /metrics, and with `--http-port` on the
HTTP API's port at /metrics too (as vLLM's; without the bearer token):
  meshserve_requests_total{method, code}      requests by RPC and gRPC status
  meshserve_finished_total{reason}            generations the engine ended, by reason (length, stop, cancelled:
                                              a client gone or a deadline passed, seen from the engine's side)
  meshserve_queue_seconds                     arrival -> prefill start
  meshserve_time_to_first_token_seconds       arrival -> first token ready
  meshserve_time_per_output_token_seconds     (last token - first token) / (generated - 1), per request
  meshserve_generated_tokens_total            tokens generated (rate() gives tokens/s)
  meshserve_prompt_tokens_total               prompt tokens prefilled (cached ones included)
  meshserve_prefix_cache_hit_tokens_total     of those, tokens whose keys and values came from the prefix cache
  meshserve_tokens_per_second                 tokens/s over the last decode steps
  meshserve_batch_occupancy                   live decode slots / max_batch, sampled every step
  meshserve_decode_step_seconds               wall time of one decode step as the engine loop sees it
  meshserve_queue_depth                       requests waiting (read live at scrape time)
  meshserve_live_slots                        decode slots holding a request (read live at scrape time)
  meshserve_speculative_draft_tokens_total    draft tokens verified (serve --speculative-tokens: prompt lookup)
  meshserve_speculative_accepted_tokens_total of those, the ones the model agreed with (each saves a decode step)
  meshserve_compile_pending_steps             steps a background warm-up has yet to compile (serve --warm-up
                                              background; until 0, requests of those shapes run padded to a larger one)
  meshserve_guided_requests_total{kind}       guided generations (json_object, json_schema, choice, regex,
                                              tool_calls), each of n samples counted
  meshserve_guided_seconds_total              engine-thread time spent on them: moving each guide past its token,
                                              its next mask, the masks' write (the share of a step it costs)

A Generate request with n > 1 (n samples) is one RPC in meshserve_requests_total; everything the engine measures
(finished, queue, time to first token, per-token time, generated, prompt and prefix-hit tokens) counts each sample as
a generation of its own: n samples of a P-token prompt add n x P prompt tokens, of which the samples that reused the
prompt another one prefilled add P - 1 hits each.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from meshserve.serving.access_log import request_line
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["ServerMetrics"]

# Seconds: from 1 ms (a tiny model's decode step) to a minute (a long queue at full load).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """One registry per server, so tests can run several servers in one process."""

    def __init__(self) -> None:
        # serve --log-requests: where count_request writes a line per request (access_log.py); None = no log
        self.request_log: TextIO | None = None
        self._log_lock = threading.Lock()  # lines from the gRPC workers and HTTP threads never interleave
        r = self.registry = CollectorRegistry()
        self.requests = Counter("meshserve_requests", "Requests by RPC and status", ["method", "code"], registry=r)
        self.draft_tokens = Counter("meshserve_speculative_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter(
            "meshserve_speculative_accepted_tokens", "Draft tokens the model agreed with", registry=r
        )
        self.queue_time = Histogram(
            "meshserve_queue_seconds", "Arrival to prefill", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "meshserve_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "meshserve_time_per_output_token_seconds",
            "Per output token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.finished_requests = Counter(
            "meshserve_finished", "Generations ended by the engine, by reason", ["reason"], registry=r
        )
        self.tokens = Counter("meshserve_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prefix_hits = Counter(
            "meshserve_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache", registry=r
        )
        self.tokens_per_second = Gauge("meshserve_tokens_per_second", "Generated tokens/s (recent steps)", registry=r)
        self.occupancy = Gauge("meshserve_batch_occupancy", "Live decode slots / max_batch", registry=r)
        self.step_time = Histogram(
            "meshserve_decode_step_seconds",
            "Decode step wall time in the engine loop",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("meshserve_queue_depth", "Requests waiting for a slot", registry=r)
        self.live_slots = Gauge("meshserve_live_slots", "Decode slots holding a request", registry=r)
        self.guided_requests = Counter("meshserve_guided_requests", "Guided generations by format", ["kind"],
                                       registry=r)  # fmt: skip
        self.guided_seconds = Counter("meshserve_guided_seconds", "Engine-thread time on guided tokens", registry=r)
        self.compile_pending = Gauge(
            "meshserve_compile_pending_steps", "Steps the background warm-up has yet to compile", registry=r
        )
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) of recent steps

    def bind(self, live_slots: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        """Read slot and queue counts live at scrape time (an idle server runs no steps that would update them)."""
        self.live_slots.set_function(live_slots)
        self.queue_depth.set_function(queue_depth)

    def serve(self, port: int, host: str) -> None:
        """Start the /metrics HTTP endpoint (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)

    def exposition(self) -> tuple[str, bytes]:
        """(content type, body) of the registry's text exposition, as --metrics-port's /metrics answers it."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def prefilled(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One prefill batch: its prompts' tokens, and how many of them the prefix cache supplied."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)

    def step(self, seconds: float, tokens: int, occupancy: float) -> None:
        """One decode step: its wall time, the tokens it generated, the batch occupancy."""
        self.step_time.observe(seconds)
        self.occupancy.set(occupancy)
        self.generated(tokens)

    def count_request(self, method: str, code: str, handles: Sequence[Any] = (), **extra: Any) -> None:
        """One request ended: counted in meshserve_requests_total{method, code} and, with --log-requests, logged
        (access_log.request_line: counts and times from its samples' handles, and `extra` fields)."""
        self.requests.labels(method, code).inc()
        if self.request_log is not None:
            line = request_line(method, code, handles, **extra)
            with self._log_lock:
                print(line, file=self.request_log, flush=True)

    def speculated(self, proposed: int, accepted: int) -> None:
        """One verify step: draft tokens proposed and accepted."""
        self.draft_tokens.inc(proposed)
        self.accepted_tokens.inc(accepted)

    def generated(self, tokens: int) -> None:
        """Tokens generated by a decode step or a prefill (each request's first token), for the counter and the
        tokens/s window."""
        now = time.monotonic()
        self.tokens.inc(tokens)
        self._recent.append((now, tokens))
        if len(self._recent) > 1:
            span = now - self._recent[0][0]
            if span > 0:
                self.tokens_per_second.set(sum(t for _, t in list(self._recent)[1:]) / span)

    def finished(
        self, queue_s: float | None, ttft_s: float | None, total_s: float, generated: int, reason: str | None = None
    ) -> None:
        if reason is not None:
            self.finished_requests.labels(reason).inc()
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if generated > 1:
                self.tpot.observe((total_s - ttft_s) / (generated - 1))
