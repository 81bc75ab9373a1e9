"""--mode=serve: the continuous-batching engine against plain generation, and the OpenAI API through the official client."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

for package in ("fastapi", "uvicorn"):
  pytest.importorskip(package, reason="the `serve` extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client (extra `dev`) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the openai client's, extra `dev`) is not installed")

from neon_qtg_jax.data.tokenizer import Tokenizer  # noqa: E402
from neon_qtg_jax.inference.sampling import SamplingParams, filter_logits, continue_prompts  # noqa: E402
from neon_qtg_jax.parallel import ShardingConfig  # noqa: E402
from neon_qtg_jax.serving import engine as engine_lib  # noqa: E402
from neon_qtg_jax.serving.api import ChatMessage, Server, create_app, render_chat  # noqa: E402
from neon_qtg_jax.serving.batch_sampling import filter_rows  # noqa: E402
from neon_qtg_jax.serving.engine import Engine, NeverFits, QueueFull, SequenceRequest, StopText  # noqa: E402
from neon_qtg_jax.serving.server import free_port, make_server, warm_up  # noqa: E402

from tiny_checkpoint import make_run  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = ml_collections.ConfigDict(dict(temperature=0.0, top_k=0, top_p=1.0))
SHARDING = ShardingConfig.all_fsdp()  # where load_model puts a tool's parameters without a run config
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
  """6 prompts of different lengths through 3 slots: the same tokens as continue_prompts() on each prompt alone."""
  _, config, model, tokenizer = run
  decoded = {}
  engine = Engine(model, lambda ids: decoded.setdefault(tuple(ids), tokenizer.decode(ids)), sharding=SHARDING,
                  eos_id=None, slots=3,
                  max_queue=16, valid_vocab=tokenizer.vocab_size).start()
  try:
    compiled_before = engine_lib.decode_slots._cache_size()
    budgets = [12, 5, 9, 16, 3, 7]
    got = collect(engine, [SequenceRequest(encode(tokenizer, p), n, temperature=0.0)
                           for p, n in zip(PROMPTS, budgets)])
    # one batched call (a prompt's greedy continuation is the same alone or in a batch: test_infer_decoding)
    reference = continue_prompts(model, [encode(tokenizer, p) for p in PROMPTS], sampling_cfg=GREEDY,
                                 max_new_tokens=max(budgets), eos_id=None, seed=0, valid_vocab=tokenizer.vocab_size,
                                 sharding=ShardingConfig.all_fsdp())
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
  engine = Engine(model, tokenizer.decode, sharding=SHARDING, eos_id=None, slots=4, max_queue=16,
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
  # not started: nothing leaves the queue
  engine = Engine(model, tokenizer.decode, sharding=SHARDING, eos_id=None, slots=1, max_queue=2)
  engine.submit([SequenceRequest([1, 2], 4), SequenceRequest([1, 2], 4)])
  with pytest.raises(QueueFull, match="serve.max_queue=2"):
    engine.submit([SequenceRequest([1, 2], 4)])
  with pytest.raises(NeverFits):  # more sequences than the queue holds: no wait would let them in
    Engine(model, tokenizer.decode, sharding=SHARDING, eos_id=None, slots=1, max_queue=2).submit(
        [SequenceRequest([1, 2], 4)] * 3)


def test_chat_template_is_the_documented_one():
  messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
              ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Sum 2+2")]
  assert render_chat(messages) == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Sum 2+2\nAssistant:"


@pytest.fixture(scope="module")
def http(run):
  """The app on uvicorn in a thread: (base URL, engine)."""
  _, config, model, tokenizer = run
  engine = Engine(model, tokenizer.decode, sharding=SHARDING, eos_id=tokenizer.eos_id, slots=4, max_queue=8,
                  valid_vocab=tokenizer.vocab_size).start()
  warm_up(engine)
  base, uv, thread = serve(engine, tokenizer, drain_seconds=5)
  yield base, engine
  uv.should_exit = True
  thread.join(10)
  engine.stop()


def serve(engine, tokenizer, drain_seconds: float):
  """The app over `engine` on uvicorn in a thread, answering /health: (base URL, uvicorn server, thread)."""
  server = Server(engine, tokenizer, model_name="tiny", default_max_tokens=8)
  port = free_port()
  uv = make_server(create_app(server), engine, "127.0.0.1", port, drain_seconds=drain_seconds)
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{port}"
  for _ in range(200):
    try:
      if httpx.get(base + "/health").status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.05)
  return base, uv, thread


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
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),           # strict types: no bool for an int
    ({"prompt": "x", "stream": "yes"}, "stream"),                  # ... no string for a bool
    ({"prompt": "x", "temperature": "0"}, "temperature"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),                              # a token id outside the vocabulary
    ({"prompt": "\ud800"}, "prompt"),                              # a lone surrogate: not encodable
    ({"prompt": "x", "stop": "\udfff"}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),              # 0 only with echo
    ({"prompt": "x", "best_of": 2}, "best_of"),                    # neutral values only
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "n": 9, "max_tokens": 2}, "n"),               # 9 sequences can never fit max_queue=8
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "word " * 200}, "prompt"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
])
def test_bad_requests_get_an_error_naming_the_field(http, body, param):
  base, _ = http
  r = httpx.post(base + "/v1/completions", content=json.dumps(body),  # ASCII JSON: "\ud800" as an escape
                 headers={"content-type": "application/json"})
  assert r.status_code == (404 if param == "model" else 400)
  error = r.json()["error"]
  assert error["param"] == param and error["message"] and error["type"] and "code" in error, error


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False, "best_of": 1,
                         "suffix": None, "logit_bias": {}, "presence_penalty": 0, "user": "u"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "store": False,
                              "tool_choice": "none", "tools": [], "logprobs": False, "parallel_tool_calls": True,
                              "response_format": {"type": "text"}, "n": 2, "best_of": 2}),
])
def test_fields_sent_at_their_neutral_values_are_accepted(http, path, body):
  base, _ = http
  r = httpx.post(base + path, json=body, timeout=120)
  assert r.status_code == 200, r.text


def test_chat_refuses_what_it_does_not_implement(http):
  base, _ = http
  for extra, param in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                       ({"tool_choice": "auto"}, "tool_choice"), ({"store": True}, "store"),
                       ({"top_logprobs": 2}, "top_logprobs")]:
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]} | extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_framework_errors_use_openai_error_shape(http):
  base, _ = http
  for r, status in [(httpx.get(base + "/v1/nothing"), 404), (httpx.get(base + "/v1/completions"), 405),
                    (httpx.post(base + "/v1/completions", content=b'{"prompt": "\xff"}',
                                headers={"content-type": "application/json"}), 400),
                    (httpx.get(base + "/v1/models/gpt-4"), 404)]:
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
  assert httpx.get(base + "/v1/models/tiny").json()["id"] == "tiny"


def test_a_full_queue_gets_429_with_retry_after(http, monkeypatch):
  base, engine = http

  def full(requests):
    raise QueueFull("8 requests are waiting for a slot (serve.max_queue=8)")
  monkeypatch.setattr(engine, "submit", full)
  r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
  assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_exceeded"


def full_log_probs(model, ids):
  """log p(ids[i] | ids[:i]) for i >= 1 from one full forward pass, and the greedy token at each position."""
  logp = jax.nn.log_softmax(model(jnp.asarray([ids[:-1]]))[0].astype(jnp.float32), axis=-1)
  return np.asarray(logp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]), np.asarray(logp)


def test_echo_logprobs_equal_the_models_own_per_token_log_probabilities(http, run):
  base, _ = http
  _, _, model, tokenizer = run
  text = "The value 7 is odd.\ndef f3(x):"
  ids = encode(tokenizer, text)
  want, logp = full_log_probs(model, ids)
  r = httpx.post(base + "/v1/completions", json={"prompt": text, "echo": True, "max_tokens": 0, "logprobs": 3}, timeout=120).json()
  choice = r["choices"][0]
  assert choice["text"] == text and r["usage"]["completion_tokens"] == 0
  lp = choice["logprobs"]
  assert "".join(lp["tokens"]) == text and len(lp["token_logprobs"]) == len(ids) - 1  # the EOS put first: not shown
  np.testing.assert_allclose(lp["token_logprobs"], want, atol=1e-4)
  for i, top in enumerate(lp["top_logprobs"]):  # 3 alternatives (+ the token itself), the best the model's best
    assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(float(logp[i].max()), abs=1e-4)
  assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
  # the same prompt as token ids (as lm-eval sends it), with one generated token after it
  r = httpx.post(base + "/v1/completions", json={"prompt": ids[1:], "echo": True, "max_tokens": 1, "logprobs": 1,
                                                 "temperature": 0}, timeout=120).json()
  lp = r["choices"][0]["logprobs"]
  np.testing.assert_allclose(lp["token_logprobs"][:-1], want, atol=1e-4)
  assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy: the sampled token is the best
  # ids that start with EOS are taken as they are: the first has no log-probability
  r = httpx.post(base + "/v1/completions", json={"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0}, timeout=120).json()
  lp = r["choices"][0]["logprobs"]
  assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
  np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4)


def test_logprobs_of_generated_tokens_streaming_and_chat(http):
  base, _ = http
  c = client(base)
  r = c.completions.create(model="tiny", prompt="def f1", max_tokens=6, temperature=0, logprobs=2, seed=0)
  lp = r.choices[0].logprobs
  assert "".join(lp.tokens).startswith(r.choices[0].text) and len(lp.tokens) == r.usage.completion_tokens
  assert all(t == max(top.values()) for t, top in zip(lp.token_logprobs, lp.top_logprobs))  # greedy
  chunks = list(c.completions.create(model="tiny", prompt="def f1", max_tokens=6, temperature=0, logprobs=2, seed=0,
                                     stream=True))
  assert sum((ch.choices[0].logprobs.token_logprobs for ch in chunks if ch.choices[0].logprobs), []) == \
      lp.token_logprobs
  chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "def f1"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].logprobs.content
  assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
  assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_tokenizer_endpoints_for_lm_evals_remote_tokenizer(http, run):
  base, _ = http
  tokenizer = run[3]
  info = httpx.get(base + "/tokenizer_info").json()
  ids = httpx.post(base + "/tokenize", json={"prompt": "def f1", "add_special_tokens": False}).json()["tokens"]
  assert ids == tokenizer.encode("def f1")
  assert httpx.post(base + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}
                    ).json()["tokens"] == [tokenizer.eos_id]
  assert httpx.post(base + "/detokenize", json={"tokens": ids}).json()["prompt"] == "def f1"


def metric(text, name):
  return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_requests_tokens_and_latencies(http, run):
  base, _ = http
  tokenizer = run[3]
  before = httpx.get(base + "/metrics").text
  httpx.post(base + "/v1/completions", json={"prompt": "The", "max_tokens": 4, "ignore_eos": True})
  httpx.post(base + "/v1/completions", json={"prompt": "x", "temperature": 9})
  after = httpx.get(base + "/metrics").text
  ok = 'neon_qtg_requests_total{model_name="tiny",endpoint="/v1/completions",status="200"}'
  bad = 'neon_qtg_requests_total{model_name="tiny",endpoint="/v1/completions",status="400"}'
  assert metric(after, ok) == metric(before, ok) + 1 and metric(after, bad) == metric(before, bad) + 1
  assert metric(after, "neon_qtg_generation_tokens_total") == metric(before, "neon_qtg_generation_tokens_total") + 4
  assert metric(after, "neon_qtg_prompt_tokens_total") == \
      metric(before, "neon_qtg_prompt_tokens_total") + len(encode(tokenizer, "The"))
  assert metric(after, "neon_qtg_time_to_first_token_seconds_count") == \
      metric(before, "neon_qtg_time_to_first_token_seconds_count") + 1
  assert metric(after, "neon_qtg_time_per_output_token_seconds_count") == \
      metric(before, "neon_qtg_time_per_output_token_seconds_count") + 3
  assert "# TYPE neon_qtg_num_requests_waiting gauge" in after


def test_malformed_json_and_bad_chat_messages_get_400(http):
  base, _ = http
  r = httpx.post(base + "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]
  r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
  assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
  with pytest.raises(openai.BadRequestError) as err:
    client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
  assert err.value.body["param"] == "temperature"


def test_more_choices_than_the_queue_holds_get_400_not_a_retried_429(http):
  base, _ = http
  with pytest.raises(openai.BadRequestError):
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


def test_a_drain_that_runs_out_answers_503_and_ends_streams_with_an_error_event(run):
  """While draining the server still listens (503 to new requests); when drain_seconds run out, a waiting
  non-streaming client gets a 503 in OpenAI's shape and a stream a last error event."""
  _, _, model, tokenizer = run
  engine = Engine(model, tokenizer.decode, sharding=SHARDING, eos_id=tokenizer.eos_id, slots=4, max_queue=8,
                  valid_vocab=tokenizer.vocab_size).start()
  step = engine._decode_step

  def slow_step():  # 50 tokens take 2.5 s, the drain 0.5 s
    time.sleep(0.05)
    step()
  engine._decode_step = slow_step
  base, uv, thread = serve(engine, tokenizer, drain_seconds=0.5)
  try:
    long = {"max_tokens": 50, "ignore_eos": True, "temperature": 1.0}
    plain = {}
    waiting = threading.Thread(target=lambda: plain.setdefault("r", httpx.post(
        base + "/v1/completions", json={"prompt": "def"} | long, timeout=60)))
    waiting.start()
    while engine.unfinished < 1:
      time.sleep(0.01)
    events, late = [], {}
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "The", "stream": True} | long,
                      timeout=60) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          events.append(line[6:])
          if len(events) == 2:
            uv.begin_shutdown()  # what SIGTERM calls
            late["r"] = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            late["health"] = httpx.get(base + "/health").status_code
    waiting.join(30)
    thread.join(30)
    assert not thread.is_alive()  # the server stopped after the drain
    assert late["r"].status_code == 503 and late["r"].json()["error"]["type"] == "server_unavailable"
    assert late["health"] == 503
    assert "drain" in json.loads(events[-1])["error"]["message"]  # the stream's last event: an error, no [DONE]
    r = plain["r"]
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_unavailable", r.text
  finally:
    uv.should_exit = True
    engine.stop()


@pytest.fixture
def portable_workdir(run, tmp_path):
  """The trained workdir copied to a new directory, with the training data directory moved away meanwhile."""
  root = run[0]
  copied = tmp_path / "copied_run"
  shutil.copytree(root / "work", copied)
  os.rename(root / "data", root / "data_away")
  try:
    yield copied
  finally:
    os.rename(root / "data_away", root / "data")


def test_the_checkpoint_carries_the_tokenizer_checked_by_its_sha256(run, tmp_path):
  from neon_qtg_jax.data.sources import DataError
  from neon_qtg_jax.inference.restore import load_tokenizer
  root, _, _, tokenizer = run
  copied = tmp_path / "work"
  shutil.copytree(root / "work", copied)
  assert load_tokenizer(str(copied)).encode("def f1(x):") == tokenizer.encode("def f1(x):")
  (step,) = [p for p in copied.iterdir() if p.name.isdigit()]
  item = step / "tokenizer" / "metadata"  # Orbax's JSON item file
  data = json.loads(item.read_text())
  item.write_text(json.dumps(data | {"info": data["info"] | {"sha256": "0" * 64}}))
  with pytest.raises(Exception, match="sha256|checksum"):  # the checkpoint's file checksums may see it first
    load_tokenizer(str(copied))
  shutil.rmtree(step / "tokenizer")  # a checkpoint saved before the item existed: the run's data directory
  assert load_tokenizer(str(copied)).sha256 == tokenizer.sha256
  os.rename(root / "data", root / "data_away")
  try:
    with pytest.raises(DataError, match="--config.data.data_dir"):
      load_tokenizer(str(copied))
  finally:
    os.rename(root / "data_away", root / "data")


def test_a_copied_workdir_generates_from_another_directory_without_the_data(portable_workdir, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         f"--config={os.path.join(ROOT, 'configs', 'neon_qtg_tiny.py')}",
                         f"--workdir={portable_workdir}", "--mode=generate", "--prompt=def f1",
                         "--config.sampling.max_new_tokens=4"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "prompt: 'def f1'" in proc.stdout
  assert re.search(r"decode [0-9.]+ s \([0-9.]+ tokens/s\), compilation apart: [0-9.]+ s", proc.stdout), proc.stdout


def test_sigterm_drains_in_flight_requests_and_exits_0(portable_workdir, tmp_path):
  """A copied workdir (the data directory gone), served from another directory; SIGTERM lets a stream finish."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                           f"--config={os.path.join(ROOT, 'configs', 'neon_qtg_tiny.py')}",
                           f"--workdir={portable_workdir}", "--mode=serve", f"--port={port}",
                           "--config.serve.slots=2", "--config.inference.weight_dtype=int8",
                           "--config.serve.model_name=tiny"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    assert client(base).completions.create(model="tiny", prompt="def", max_tokens=3).usage.completion_tokens >= 1
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


def test_lm_eval_local_completions_scores_the_server_as_the_adapter_scores_the_checkpoint(http, run, monkeypatch):
  """lm-eval's own OpenAI client (local-completions, remote tokenizer) against the server: the same log-likelihoods
  (1e-4) and multiple-choice accuracy as the in-process adapter on the same checkpoint."""
  lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (extra `harness`) is not installed")
  pytest.importorskip("tenacity", reason="tenacity (lm-eval's API models, extra `harness`) is not installed")
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager
  from neon_qtg_jax.evaluation.harness import NeonQTGLM
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
  base, _ = http
  root = run[0]
  adapter = NeonQTGLM(checkpoint=str(root / "work"), batch_size=4)
  # max_length: the context less the EOS the server puts first and the one token lm-eval asks to generate
  remote = get_model("local-completions")(base_url=base + "/v1/completions", model="tiny", max_length=62,
                                            tokenizer_backend="remote", max_retries=1)

  class Request:
    def __init__(self, *args):
      self.args = args
  pairs = [("The value 4 is", " even."), ("def f3(x):\n\treturn x * 3 +", " 3"), ("The value 9", " is odd.")]
  want = adapter.loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)
  got = remote.loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  task_dir = os.path.join(ROOT, "tests", "harness_tasks")
  seeds = dict(random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
  by_server = lm_eval.simple_evaluate(model=remote, tasks=["neon_local_mc"],
                                      task_manager=TaskManager(include_path=task_dir), **seeds)["results"]
  in_process = lm_eval.simple_evaluate(model=adapter, tasks=["neon_local_mc"],
                                       task_manager=TaskManager(include_path=task_dir), **seeds)["results"]
  for key in ("acc,none", "acc_norm,none"):
    assert by_server["neon_local_mc"][key] == pytest.approx(in_process["neon_local_mc"][key], abs=1e-3)
