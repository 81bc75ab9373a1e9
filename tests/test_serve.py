"""--mode=serve: the continuous-batching engine against plain generation, and the OpenAI API through the official client."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

for package in ("fastapi", "uvicorn"):
  pytest.importorskip(package, reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[dev]')")

from neon_qtg_jax.data.tokenizer import Tokenizer  # noqa: E402
from neon_qtg_jax.inference.sampling import SamplingParams, filter_logits, generate  # noqa: E402
from neon_qtg_jax.serving import engine as engine_lib  # noqa: E402
from neon_qtg_jax.serving.api import ChatMessage, Server, create_app, render_chat  # noqa: E402
from neon_qtg_jax.serving.batch_sampling import filter_rows  # noqa: E402
from neon_qtg_jax.serving.engine import Engine, QueueFull, SequenceRequest, StopText  # noqa: E402
from neon_qtg_jax.serving.server import free_port, make_server, warm_up  # noqa: E402

from tiny_checkpoint import make_run  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = ml_collections.ConfigDict(dict(temperature=0.0, top_k=0, top_p=1.0))
PROMPTS = ["def f1", "The value", "def f12(x):\n\treturn", "The", "def f3(x):", "The value 7 is"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  config, model = make_run(root)
  return root, config, model, Tokenizer.load(config.data.data_dir)


def encode(tokenizer, text):
  return [tokenizer.eos_id] + tokenizer.encode(text)


def expected_text(tokenizer, prompt_ids, ids):
  """What the engine sends for generated ids: StopText's deltas, then what it held back."""
  stream = StopText(tokenizer.decode, prompt_ids, ())
  return "".join(stream.push(t)[0] for t in ids) + stream.flush()


def collect(engine, requests, timeout=120):
  """Submits and waits; returns (text, finish reason, tokens) per request."""
  out = [["", None, 0] for _ in requests]
  done = threading.Event()

  def emitter(i):
    def emit(event):
      out[i][0] += event.text
      out[i][2] = event.completion_tokens
      if event.finish_reason:
        out[i][1] = event.finish_reason
        if all(o[1] for o in out):
          done.set()
    return emit
  for i, r in enumerate(requests):
    r.emit = emitter(i)
  engine.submit(requests)
  assert done.wait(timeout), "the engine did not finish in time"
  return [tuple(o) for o in out]


def test_row_filter_matches_the_batch_sampler_per_row():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  temperature = jnp.asarray([0.5, 1.0, 1.3, 0.7])
  top_p = jnp.asarray([0.9, 1.0, 0.5, 0.99])
  got = filter_rows(logits, temperature, top_p)
  for i in range(4):
    want = filter_logits(logits[i:i + 1], SamplingParams(float(temperature[i]), 0, float(top_p[i])))
    np.testing.assert_allclose(got[i], want[0], rtol=1e-6)


def test_stop_strings_are_held_back_and_never_sent():
  pieces = ["ab", "c\nUs", "er", ": x"]
  stream = StopText(lambda ids: "".join(pieces[i] for i in ids if i >= 0), [-1], ("\nUser:",))
  sent = [stream.push(i) for i in range(len(pieces))]
  assert sent == [("ab", False), ("c", False), ("", False), ("", True)]


def test_continuous_batching_gives_each_prompt_its_own_greedy_continuation(run):
  """6 prompts of different lengths through 3 slots: the same tokens as generate() on each prompt alone."""
  _, config, model, tokenizer = run
  decoded = {}
  engine = Engine(model, lambda ids: decoded.setdefault(tuple(ids), tokenizer.decode(ids)), eos_id=None, slots=3,
                  max_queue=16, valid_vocab=tokenizer.vocab_size).start()
  try:
    compiled_before = engine_lib.decode_slots._cache_size()
    budgets = [12, 5, 9, 16, 3, 7]
    got = collect(engine, [SequenceRequest(encode(tokenizer, p), n, temperature=0.0)
                           for p, n in zip(PROMPTS, budgets)])
    # one batched call (a prompt's greedy continuation is the same alone or in a batch: test_infer_decoding)
    reference = generate(model, [encode(tokenizer, p) for p in PROMPTS], sampling_cfg=GREEDY,
                         max_new_tokens=max(budgets), eos_id=None, seed=0, valid_vocab=tokenizer.vocab_size)
    for prompt, n, (text, reason, tokens), want in zip(PROMPTS, budgets, got, reference):
      want = want[:n]
      assert (reason, tokens) == ("length", n)
      assert text == expected_text(tokenizer, encode(tokenizer, prompt), want), prompt
    assert engine.stats.max_prefills_between_decode_steps == 1  # a join stalls the others for one prefill at most
    assert engine.stats.prefills == len(PROMPTS)
    assert engine_lib.decode_slots._cache_size() - compiled_before <= 1  # one decode program for every mix
  finally:
    engine.stop()


def test_a_seeded_sample_does_not_depend_on_its_neighbours(run):
  _, config, model, tokenizer = run
  engine = Engine(model, tokenizer.decode, eos_id=None, slots=4, max_queue=16,
                  valid_vocab=tokenizer.vocab_size).start()
  try:
    def request(prompt, seed):
      return SequenceRequest(encode(tokenizer, prompt), 10, temperature=1.0, top_p=0.9, seed=seed)
    alone = collect(engine, [request("def f1", 7)])[0]
    crowded = collect(engine, [request("The value", 1), request("def f1", 7), request("The", 2)])[1]
    assert alone == crowded
  finally:
    engine.stop()


def test_a_full_queue_refuses_new_sequences(run):
  _, _, model, tokenizer = run
  engine = Engine(model, tokenizer.decode, eos_id=None, slots=1, max_queue=2)  # not started: nothing leaves the queue
  engine.submit([SequenceRequest([1, 2], 4), SequenceRequest([1, 2], 4)])
  with pytest.raises(QueueFull, match="serve.max_queue=2"):
    engine.submit([SequenceRequest([1, 2], 4)])


def test_chat_template_is_the_documented_one():
  messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
              ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Sum 2+2")]
  assert render_chat(messages) == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Sum 2+2\nAssistant:"


@pytest.fixture(scope="module")
def http(run):
  """The app on uvicorn in a thread: (base URL, engine)."""
  _, config, model, tokenizer = run
  engine = Engine(model, tokenizer.decode, eos_id=tokenizer.eos_id, slots=4, max_queue=8,
                  valid_vocab=tokenizer.vocab_size).start()
  warm_up(engine)
  server = Server(engine, tokenizer, model_name="tiny", default_max_tokens=8)
  port = free_port()
  uv = make_server(create_app(server), engine, "127.0.0.1", port, drain_seconds=5)
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{port}"
  for _ in range(200):
    try:
      if httpx.get(base + "/health").status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.05)
  yield base, engine
  uv.should_exit = True
  thread.join(10)
  engine.stop()


def client(base):
  return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_streaming_and_not(http, run):
  base, engine = http
  tokenizer = run[3]
  c = client(base)
  assert [m.id for m in c.models.list().data] == ["tiny"]
  r = c.completions.create(model="tiny", prompt="def f1", max_tokens=10, temperature=0, seed=0)
  assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
  assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens == len(encode(tokenizer, "def f1"))
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
  chunks = list(c.completions.create(model="tiny", prompt="def f1", max_tokens=10, temperature=0, seed=0, stream=True))
  assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
  assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

  several = c.completions.create(model="tiny", prompt="The", max_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=5,
                                 stop=["\n"])
  assert sorted(ch.index for ch in several.choices) == [0, 1, 2]
  assert all("\n" not in ch.text for ch in several.choices)
  again = c.completions.create(model="tiny", prompt="The", max_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=5,
                               stop=["\n"])
  assert [ch.text for ch in again.choices] == [ch.text for ch in several.choices]  # seed: reproducible


def test_openai_client_chat_streaming_and_not(http):
  base, _ = http
  c = client(base)
  messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "def f1"}]
  r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, seed=1)
  assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
  assert "\nUser:" not in r.choices[0].message.content
  stream = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, seed=1,
                                          stream=True, stream_options={"include_usage": True}))
  assert stream[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == r.choices[0].message.content
  assert stream[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "word " * 200}, "prompt"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
])
def test_bad_requests_get_an_error_naming_the_field(http, body, param):
  base, _ = http
  r = httpx.post(base + "/v1/completions", json=body)
  assert r.status_code == (404 if param == "model" else 400)
  error = r.json()["error"]
  assert error["param"] == param and error["message"], error


def test_malformed_json_and_bad_chat_messages_get_400(http):
  base, _ = http
  r = httpx.post(base + "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]
  r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
  assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
  with pytest.raises(openai.BadRequestError) as err:
    client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
  assert err.value.body["param"] == "temperature"


def test_more_choices_than_the_queue_holds_get_429(http):
  base, _ = http
  with pytest.raises(openai.RateLimitError):
    client(base).completions.create(model="tiny", prompt="x", n=9, max_tokens=2)


def test_eight_concurrent_clients(http):
  base, engine = http
  c = client(base)
  want = {p: c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
          for p in PROMPTS[:4]}
  results, errors = {}, []

  def one(i):
    try:
      prompt = PROMPTS[i % 4]
      if i % 2:
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
      else:
        text = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
      results[i] = (prompt, text)
    except Exception as err:  # noqa: BLE001 - reported below
      errors.append(err)
  threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert not errors and len(results) == 8
  assert all(text == want[prompt] for prompt, text in results.values())


def test_a_client_that_disconnects_frees_its_slot(http, monkeypatch):
  base, engine = http
  cancelled = engine.stats.cancelled
  step = engine._decode_step

  def slow_step():  # 60 tokens take 3 s: the clients leave long before their sequences would end
    time.sleep(0.05)
    step()
  monkeypatch.setattr(engine, "_decode_step", slow_step)
  with httpx.stream("POST", base + "/v1/completions", json={"prompt": "The", "max_tokens": 60, "stream": True,
                                                             "temperature": 1.0, "ignore_eos": True}, timeout=60) as r:
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
  with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
    httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 60, "temperature": 1.0,
                                               "ignore_eos": True}, timeout=0.05)
  deadline = time.monotonic() + 20
  while (engine.stats.cancelled < cancelled + 2 or engine.busy_slots) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert engine.stats.cancelled == cancelled + 2 and engine.busy_slots == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(run):
  root, _, _, _ = run
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/neon_qtg_tiny.py",
                           f"--workdir={root / 'work'}", "--mode=serve", f"--port={port}", "--config.serve.slots=2",
                           "--config.inference.weight_dtype=int8"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
      try:
        health = httpx.get(base + "/health")
        if health.status_code == 200:
          break
      except httpx.HTTPError:
        time.sleep(0.2)
    assert health.json()["weight_dtype"] == "int8"
    events = []
    with httpx.stream("POST", base + "/v1/completions", timeout=60,
                      json={"prompt": "The", "max_tokens": 40, "stream": True, "ignore_eos": True,
                            "temperature": 1.0}) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          events.append(line[6:])
          if len(events) == 2:
            proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # ran to its end after SIGTERM
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
    print(proc.stdout.read())
