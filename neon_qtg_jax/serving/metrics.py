"""/metrics: the server's counters, gauges and latency histograms in Prometheus' text format (0.0.4).

Named after vLLM's: requests by endpoint and status code, queued and running sequences, prompt
and generated tokens, time to first token (from the request's arrival, queueing included) and
time per output token after the first, end-to-end request latency. Written by hand (no
prometheus_client dependency); every method is thread-safe (the engine thread records tokens,
the event loop requests).
"""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Callable

PREFIX = "neon_qtg_"
# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0)


class Histogram:
  def __init__(self, buckets: tuple[float, ...]):
    self.buckets = buckets
    self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
    self.sum = 0.0
    self.count = 0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.sum += value
    self.count += 1

  def lines(self, name: str, labels: str) -> list[str]:
    out, running = [], 0
    for bound, n in zip(self.buckets, self.counts):
      running += n
      out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {running}')
    out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="+Inf"}} {self.count}')
    braces = f"{{{labels}}}" if labels else ""
    out += [f"{name}_sum{braces} {self.sum}", f"{name}_count{braces} {self.count}"]
    return out


class Metrics:
  """What /metrics reports; `gauges` is called at each scrape for the engine's current state."""

  def __init__(self, model_name: str, gauges: Callable[[], dict[str, float]] | None = None):
    self.model_name = model_name
    self.gauges = gauges or (lambda: {})
    self._lock = threading.Lock()
    self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
    self.prompt_token_count = 0
    self.generation_token_count = 0
    self.ttft = Histogram(TTFT_BUCKETS)
    self.tpot = Histogram(TPOT_BUCKETS)
    self.latency = Histogram(LATENCY_BUCKETS)

  def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
    with self._lock:
      self.requests[(endpoint, int(status))] += 1
      if seconds is not None and status < 400:
        self.latency.observe(seconds)

  def prompt_tokens(self, n: int) -> None:
    with self._lock:
      self.prompt_token_count += n

  def token(self, seconds: float, *, first: bool) -> None:
    """A generated token, `seconds` after the request arrived (first) or after the previous token."""
    with self._lock:
      self.generation_token_count += 1
      (self.ttft if first else self.tpot).observe(seconds)

  def render(self) -> str:
    model = f'model_name="{self.model_name}"'
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
      lines.extend([f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"] + samples)

    gauges = self.gauges()
    with self._lock:
      metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code",
             [f'{PREFIX}requests_total{{{model},endpoint="{e}",status="{s}"}} {n}'
              for (e, s), n in sorted(self.requests.items())])
      for name, help_text in (("num_requests_waiting", "sequences waiting for a slot"),
                              ("num_requests_running", "sequences decoding in a slot"),
                              ("slots", "cache rows decoded together (serve.slots)")):
        metric(name, "gauge", help_text, [f"{PREFIX}{name}{{{model}}} {gauges.get(name, 0)}"])
      metric("prompt_tokens_total", "counter", "prompt tokens prefilled (the EOS before each prompt included)",
             [f"{PREFIX}prompt_tokens_total{{{model}}} {self.prompt_token_count}"])
      metric("generation_tokens_total", "counter", "tokens generated",
             [f"{PREFIX}generation_tokens_total{{{model}}} {self.generation_token_count}"])
      metric("time_to_first_token_seconds", "histogram", "from a sequence's arrival to its first token",
             self.ttft.lines(f"{PREFIX}time_to_first_token_seconds", model))
      metric("time_per_output_token_seconds", "histogram", "between two tokens of a sequence",
             self.tpot.lines(f"{PREFIX}time_per_output_token_seconds", model))
      metric("e2e_request_latency_seconds", "histogram", "from a request's arrival to its answer's end",
             self.latency.lines(f"{PREFIX}e2e_request_latency_seconds", model))
    return "\n".join(lines) + "\n"
