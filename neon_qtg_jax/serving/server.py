"""--mode=serve: the OpenAI-compatible HTTP server over a checkpoint, on uvicorn.

  launch.py --mode=serve --workdir=runs/tiny [--checkpoint=best] [--host=127.0.0.1] [--port=8000]

Loads the checkpoint with inference.weight_dtype (and the tokenizer saved with it), compiles the
decode step and the smallest prefill before it listens, then serves until SIGTERM or Ctrl-C: from
then on it keeps listening but answers every new request 503, lets the running and queued ones
finish (at most serve.drain_seconds; then each gets a 503, a stream a last error event), waits
for those answers to go out, and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator

import jax.numpy as jnp
import uvicorn

from neon_qtg_jax.serving.api import Server, create_app
from neon_qtg_jax.serving.engine import Engine, SequenceRequest, wait_until_idle

log = logging.getLogger(__name__)

ANSWER_SECONDS = 5  # after the drain, for the last answers to reach their clients


class DrainingServer(uvicorn.Server):
  """uvicorn's server whose SIGTERM/SIGINT first stop the engine taking work, then shut down gracefully.

  uvicorn re-raises a captured signal after its shutdown, which would end the process with the
  signal rather than exit 0; this handler takes the signals itself.
  """

  def __init__(self, config: uvicorn.Config, engine: Engine, drain_seconds: float = 60.0,
               in_flight: Callable[[], int] = lambda: 0):
    super().__init__(config)
    self.engine, self.drain_seconds, self.in_flight = engine, drain_seconds, in_flight
    self.drainer: threading.Thread | None = None

  def begin_shutdown(self) -> None:
    """Stops the engine taking work and drains in a thread; the listener stays open (503s) until it is done."""
    if self.drainer is not None:
      self.force_exit = self.should_exit = True
      return
    log.warning("shutting down: draining %d running and %d queued sequences (at most %g s)", self.engine.busy_slots,
                self.engine.queued, self.drain_seconds)
    self.engine.drain()
    self.drainer = threading.Thread(target=self._drain, name="drain", daemon=True)
    self.drainer.start()

  def _drain(self) -> None:
    if not wait_until_idle(self.engine, self.drain_seconds):
      n = self.engine.cancel_all(f"the server is shutting down and its drain time (serve.drain_seconds="
                                 f"{self.drain_seconds:g}) ran out")
      log.warning("drain time ran out: %d sequences cancelled, their clients get 503", n)
      wait_until_idle(self.engine, 10.0)
    deadline = time.monotonic() + ANSWER_SECONDS  # the answers, 503s included, go out before the listener closes
    while self.in_flight() > 0 and time.monotonic() < deadline:
      time.sleep(0.02)
    self.should_exit = True

  @contextlib.contextmanager
  def capture_signals(self) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    previous = {sig: signal.signal(sig, lambda *_: self.begin_shutdown()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def warm_up(engine: Engine, timeout: float = 600.0) -> float:
  """Compiles the decode step and the smallest prefill with one throwaway sequence; returns seconds."""
  began = time.perf_counter()
  engine.submit([SequenceRequest([0], max_tokens=2, temperature=0.0, ignore_eos=True)])  # EOS would skip the decode
  if not wait_until_idle(engine, timeout):
    raise RuntimeError(f"warm-up did not finish within {timeout} s")
  return time.perf_counter() - began


def make_server(app, engine: Engine, host: str, port: int, drain_seconds: float) -> DrainingServer:
  server = app.state.server
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=ANSWER_SECONDS,
                          access_log=False)
  return DrainingServer(config, engine, drain_seconds, lambda: server.in_flight)


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def build(config, workdir: str, checkpoint: str) -> tuple[Server, Engine]:
  """The engine (started, warm) and the API state for a checkpoint."""
  from neon_qtg_jax.inference.quantize import load_for_inference
  from neon_qtg_jax.inference.restore import load_tokenizer
  from neon_qtg_jax.parallel import ShardingConfig
  from neon_qtg_jax.serving.metrics import Metrics

  restored = load_for_inference(workdir, checkpoint, config, param_dtype="auto",
                                sharding=ShardingConfig.from_config(config.parallel))
  tokenizer = load_tokenizer(workdir, checkpoint, restored.run_config, config)
  name = config.serve.model_name or os.path.basename(os.path.abspath(workdir))
  engine = Engine(restored.model, tokenizer.decode, eos_id=tokenizer.eos_id, slots=config.serve.slots,
                  max_queue=config.serve.max_queue, valid_vocab=tokenizer.vocab_size,
                  sharding=restored.sharding).start()
  seconds = warm_up(engine)
  engine.metrics = Metrics(name)  # after the warm-up, which is no request
  info = {"checkpoint_step": restored.step, "weight_dtype": restored.weight_dtype,
          "parameter_bytes": restored.parameter_bytes, "context": int(restored.model.cfg.max_seq_len),
          "compute_dtype": str(jnp.dtype(restored.model.cfg.dtype))}
  print(f"model {name!r}: checkpoint step {restored.step}, weights {restored.weight_dtype} "
        f"({restored.parameter_bytes / 2**20:.1f} MiB), {config.serve.slots} slots of {info['context']} tokens; "
        f"compiled in {seconds:.1f} s", flush=True)
  return Server(engine, tokenizer, model_name=name, default_max_tokens=config.sampling.max_new_tokens,
                info=info), engine


def run(config, args) -> int:
  server, engine = build(config, args.workdir, args.checkpoint)
  http = make_server(create_app(server), engine, args.host, args.port, config.serve.drain_seconds)
  print(f"serving {server.model_name!r} at http://{args.host}:{args.port}/v1 (OpenAI API; /health)", flush=True)
  try:
    http.run()
  finally:
    engine.stop(timeout=30)
  if engine.error is not None:
    print(f"error: the engine failed: {engine.error}")
    return 1
  print("stopped", flush=True)
  return 0
