"""The OpenAI HTTP API over the engine: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
and vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's `local-completions` tokenizes through them).

FastAPI validates request bodies with the strict pydantic models below (`max_tokens: true` or
`stream: "yes"` are refused, not converted); every error, the framework's own 404 and 405
included, is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the field (a malformed JSON body: `param` "body"). A full queue gets 429 with
`Retry-After`, a request that could never fit the queue 400, a server that is shutting down 503.
Fields OpenAI defines that this server does not implement are accepted at their neutral value
(`best_of: 1`, `store: false`, `tool_choice: "none"`, ...: NEUTRAL) and refused, naming them,
at any other. Streaming answers are server-sent events (`data: {chunk}` lines, then
`data: [DONE]`; an error after the stream began is a last `data: {"error": ...}` event), as
OpenAI's clients read them. A client that goes away cancels its sequences, which frees their
slots before the engine's next step.

Log-probabilities are the model's own (log_softmax of its logits, as --mode=eval and the adapter score, before
temperature and top-p): completions' `logprobs: k` (0 to MAX_LOGPROBS) gives each token's and its
k best alternatives, `echo` returns the prompt with its tokens' log-probabilities first (with
`max_tokens: 0`, only those: how lm-eval scores a text); chat's `logprobs: true` and
`top_logprobs: k`. The EOS the server puts before a prompt is not shown.

The model is a base language model, not tuned to follow instructions or to chat. The chat
endpoint renders the conversation with this template (CHAT_TEMPLATE) and continues it:

    {system messages, each followed by a blank line}User: {content}
    Assistant: {content}
    ...
    User: {content}
    Assistant:

generation stops at "\\nUser:" (besides the request's own stop strings), and the reply is the
continuation with its leading whitespace removed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from neon_qtg_jax.serving.engine import (MAX_LOGPROBS, Draining, Engine, Event, NeverFits, QueueFull, SequenceRequest,
                                         TokenLogprob)
from neon_qtg_jax.serving.metrics import Metrics

CHAT_STOP = "\nUser:"
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
DISCONNECT_POLL_SECONDS = 0.25
RETRY_AFTER_SECONDS = 1

# OpenAI fields this server does not implement, accepted at these values only (best_of also when it equals n)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "store": (None, False),
    "metadata": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]), "prediction": (None,), "audio": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,),
}
COMPLETION_NEUTRAL = ("best_of", "suffix", "logit_bias")


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Strict(BaseModel):
  """Unknown fields are refused (400 naming them), as OpenAI does; values are never converted between types."""
  model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
  include_usage: bool = False


class SamplingFields(Strict):
  """Fields both endpoints share."""
  model: str | None = None
  max_tokens: int | None = Field(default=None, ge=0)
  temperature: float = Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  n: int = Field(default=1, ge=1, le=MAX_CHOICES)
  stop: str | list[str] | None = None
  seed: int | None = Field(default=None, ge=-2**63, lt=2**63)
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  ignore_eos: bool = False  # vLLM's extension: run to max_tokens through EOS (fixed lengths for benchmarks)
  presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)   # accepted at their defaults only
  frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
  best_of: Any = None
  logit_bias: Any = None

  def check(self) -> None:
    """What the field types cannot say: neutral values of unimplemented fields, stop strings, stream_options."""
    for name in self.neutral_fields():
      value = getattr(self, name)
      if name == "best_of" and type(value) is int and value == self.n:
        continue
      if not any(type(value) is type(ok) and value == ok for ok in NEUTRAL[name]):
        allowed = " or ".join(json.dumps(ok) for ok in NEUTRAL[name])
        raise ApiError(400, f"{name}={json.dumps(value)} is not supported by this server (only {allowed})", name)
    if self.stream_options is not None and not self.stream:
      raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    stop = self.stop_strings()
    for i, s in enumerate(stop):
      check_unicode(s, "stop" if isinstance(self.stop, str) else f"stop[{i}]")

  def neutral_fields(self) -> tuple[str, ...]:
    return COMPLETION_NEUTRAL

  def stop_strings(self) -> tuple[str, ...]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
      raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


class CompletionRequest(SamplingFields):
  prompt: str | list[str] | list[int] | list[list[int]]
  echo: bool = False
  logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
  suffix: Any = None


class ChatMessage(Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[dict[str, Any]]
  name: str | None = None

  def text(self, index: int) -> str:
    if isinstance(self.content, str):
      return check_unicode(self.content, f"messages[{index}].content")
    parts = []
    for part in self.content:
      if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ApiError(400, "only text content parts are supported", f"messages[{index}].content")
      parts.append(check_unicode(part["text"], f"messages[{index}].content"))
    return "".join(parts)


class ChatRequest(SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  logprobs: bool | None = None
  top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
  store: Any = None
  metadata: Any = None
  tools: Any = None
  tool_choice: Any = None
  functions: Any = None
  function_call: Any = None
  parallel_tool_calls: Any = None
  response_format: Any = None
  service_tier: Any = None
  modalities: Any = None
  prediction: Any = None
  audio: Any = None
  reasoning_effort: Any = None
  web_search_options: Any = None

  def neutral_fields(self) -> tuple[str, ...]:
    return tuple(name for name in NEUTRAL if name != "suffix")


class TokenizeRequest(Strict):
  prompt: str
  model: str | None = None
  add_special_tokens: bool = True


class DetokenizeRequest(Strict):
  tokens: list[int]
  model: str | None = None


def check_unicode(text: str, param: str) -> str:
  """text, or a 400 where it holds a lone surrogate (JSON's "\\ud800"), which no tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as err:
    raise ApiError(400, f"{param} is not valid Unicode: a lone surrogate at character {err.start}", param) from None
  return text


def render_chat(messages: list[ChatMessage]) -> str:
  """The documented template: system text, then "User: ..." / "Assistant: ..." lines, ending "Assistant:"."""
  system = [m.text(i) for i, m in enumerate(messages) if m.role in ("system", "developer")]
  lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.text(i)}" for i, m in enumerate(messages)
           if m.role in ("user", "assistant")]
  return "".join(s + "\n\n" for s in system) + "\n".join(lines + ["Assistant:"])


class Prompt:
  """One prompt as the engine sees it (ids: EOS first) and as the client sent it (text, shown_from)."""

  def __init__(self, ids: list[int], text: str, shown_from: int):
    self.ids, self.text, self.shown_from = ids, text, shown_from


class Server:
  """What the endpoints need: the engine, the tokenizer and the limits."""

  def __init__(self, engine: Engine, tokenizer, *, model_name: str, default_max_tokens: int,
               info: dict[str, Any] | None = None, metrics: Metrics | None = None):
    self.engine, self.tokenizer = engine, tokenizer
    self.model_name, self.default_max_tokens = model_name, default_max_tokens
    self.context = engine.context
    self.info = info or {}
    self.created = int(time.time())
    self.metrics = metrics or engine.metrics or Metrics(model_name)
    if engine.metrics is None:
      engine.metrics = self.metrics
    self.metrics.model_name = model_name
    self.metrics.gauges = lambda: {"num_requests_waiting": engine.queued, "num_requests_running": engine.busy_slots,
                                   "slots": engine.num_slots}
    self.in_flight = 0  # HTTP requests being answered (the drain waits for them)
    self.token_text = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))

  def encode(self, text: str, param: str = "prompt") -> list[int]:
    """EOS + tokens: the separator the training stream puts before every document."""
    return [self.tokenizer.eos_id] + self.tokenizer.encode(check_unicode(text, param))

  def prompt(self, value: str | list[int], param: str) -> Prompt:
    """A text, or token ids (EOS put first unless they start with it); 400 for ids outside the vocabulary."""
    if isinstance(value, str):
      return Prompt(self.encode(value, param), value, 1)
    if not value:
      raise ApiError(400, f"{param} is an empty list of token ids", param)
    bad = [t for t in value if not 0 <= t < self.tokenizer.vocab_size]
    if bad:
      raise ApiError(400, f"{param} holds token id {bad[0]}, outside the vocabulary (0 to "
                     f"{self.tokenizer.vocab_size - 1})", param)
    if value[0] == self.tokenizer.eos_id:
      return Prompt(list(value), self.tokenizer.decode(value), 0)
    return Prompt([self.tokenizer.eos_id] + list(value), self.tokenizer.decode(value), 1)

  def token_budget(self, prompt_ids: list[int], max_tokens: int | None, prompt_field: str,
                   max_field: str = "max_tokens") -> int:
    room = self.context - len(prompt_ids)
    if max_tokens == 0 and room >= 0:
      return 0
    if room < 1:
      raise ApiError(400, f"{prompt_field} has {len(prompt_ids)} tokens; the model's context is {self.context} tokens "
                     "(model.max_seq_len), which leaves no room to generate", prompt_field)
    if max_tokens is None:
      return min(self.default_max_tokens, room)
    if max_tokens > room:
      raise ApiError(400, f"{max_field}={max_tokens} with a prompt of {len(prompt_ids)} tokens exceeds the model's "
                     f"context of {self.context} tokens (at most {room})", max_field)
    return max_tokens

  def check_model(self, name: str | None) -> None:
    if name is not None and name != self.model_name:
      raise ApiError(404, f"model {name!r} is not served here; this server has {self.model_name!r}", "model",
                     "model_not_found")

  def model_card(self) -> dict[str, Any]:
    return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "neon_qtg_jax",
            "max_model_len": self.context}

  # ---- logprobs in OpenAI's two shapes
  def _top(self, entry: TokenLogprob) -> list[tuple[str, float]]:
    """The alternatives, the sampled token added where it is not among them (OpenAI: up to k + 1)."""
    top = [(self.token_text(i), lp) for i, lp in entry.top]
    if entry.logprob is not None and all(i != entry.token for i, _ in entry.top):
      top.append((self.token_text(entry.token), entry.logprob))
    return top

  def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offsets count from `offset`."""
    tokens, offsets = [], []
    for e in entries:
      offsets.append(offset)
      tokens.append(self.token_text(e.token))
      offset += len(tokens[-1])
    top = []
    for e in entries:
      if e.logprob is None:
        top.append(None)
        continue
      alternatives: dict[str, float] = {}
      for text, lp in self._top(e):
        alternatives.setdefault(text, lp)  # best first: two ids with one text keep the higher
      top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}

  def chat_logprobs(self, entries: list[TokenLogprob], k: int) -> list[dict[str, Any]]:
    def item(text: str, lp: float) -> dict[str, Any]:
      return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return [item(self.token_text(e.token), e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in self._top(e)[:k]]}
            for e in entries]


async def _collect(engine: Engine, requests: list[SequenceRequest], http_request: Request | None,
                   sequences: list) -> AsyncIterator[tuple[int, Event]]:
  """Submits the sequences and yields (choice index, event) as the engine produces them.

  Leaving the iterator early (client gone, an error) cancels whatever has not finished. With
  http_request it also polls for a disconnected client (Starlette cancels a stream whose client
  left). `sequences` receives the submitted sequences, so a cancelled caller can cancel them
  without awaiting (inside a cancelled task every await raises at once).
  """
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
  for index, r in enumerate(requests):
    r.emit = (lambda i: lambda event: loop.call_soon_threadsafe(queue.put_nowait, (i, event)))(index)
  try:
    sequences.extend(engine.submit(requests))
  except NeverFits as err:
    raise ApiError(400, str(err), "n", "invalid_request_error") from None
  except QueueFull as err:
    raise ApiError(429, str(err), None, "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
  except Draining as err:
    raise ApiError(503, str(err), None, "server_unavailable") from None
  open_choices = len(requests)
  next_poll = time.monotonic() + DISCONNECT_POLL_SECONDS
  try:
    while open_choices:
      if http_request is not None and time.monotonic() >= next_poll:  # also while events keep coming
        next_poll = time.monotonic() + DISCONNECT_POLL_SECONDS
        if await http_request.is_disconnected():
          return
      try:
        index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
      except asyncio.TimeoutError:
        continue
      if event.finish_reason == "cancelled":
        reason = engine.cancel_reason or (f"the engine failed: {engine.error}" if engine.error else None)
        raise ApiError(503, f"the request was cancelled: {reason or 'the server is shutting down'}", None,
                       "server_unavailable")
      if event.finish_reason is not None:
        open_choices -= 1
      yield index, event
  finally:
    for seq in sequences:
      seq.cancel()
    engine.wake()


def _sequence_requests(prompts: list[Prompt], budgets: list[int], body: SamplingFields, stop: tuple[str, ...], *,
                       logprobs: int | None = None, echo: bool = False) -> list[SequenceRequest]:
  seed = body.seed if body.seed is not None else secrets.randbits(31)
  out = []
  for p, (prompt, budget) in enumerate(zip(prompts, budgets)):
    for c in range(body.n):
      out.append(SequenceRequest(prompt.ids, budget, body.temperature, body.top_p, stop, seed, choice=p * body.n + c,
                                 ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=echo))
  return out


def _usage(prompts: list[Prompt], tokens: list[int]) -> dict[str, int]:
  prompt_tokens = sum(len(p.ids) for p in prompts)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(tokens),
          "total_tokens": prompt_tokens + sum(tokens)}


def _sse(payload: dict[str, Any] | str) -> str:
  return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class MetricsAndDrain:
  """ASGI middleware: counts answers by endpoint and status for /metrics and keeps Server.in_flight."""

  def __init__(self, app, server: Server, routes: tuple[str, ...]):
    self.app, self.server, self.routes = app, server, routes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope.get("path", "")
    endpoint = path if path in self.routes else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
    began, status, recorded = time.monotonic(), [500], [False]

    def record():
      if not recorded[0]:
        recorded[0] = True
        self.server.metrics.request(endpoint, status[0], time.monotonic() - began)

    async def send_and_count(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)
      if message["type"] == "http.response.body" and not message.get("more_body", False):
        record()

    self.server.in_flight += 1
    try:
      await self.app(scope, receive, send_and_count)
    finally:
      self.server.in_flight -= 1
      record()


def create_app(server: Server) -> FastAPI:
  app = FastAPI(title="neon_qtg", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.server = server

  @app.exception_handler(ApiError)
  async def api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.param, err.kind), status_code=err.status, headers=err.headers)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (404 no such route, 405, a body that is not UTF-8) in OpenAI's shape."""
    if err.status_code == 404:
      message, kind = f"Invalid URL ({request.method} {request.url.path})", "invalid_request_error"
    elif err.status_code == 405:
      message, kind = f"method {request.method} is not allowed on {request.url.path}", "invalid_request_error"
    else:
      message, kind = str(err.detail), "invalid_request_error" if err.status_code < 500 else "server_error"
    param = None
    if err.status_code == 400 and "parsing the body" in str(err.detail):
      message, param = "the request body is not valid JSON in UTF-8", "body"
    return JSONResponse(error_body(message, param, kind), status_code=err.status_code, headers=err.headers)

  @app.exception_handler(Exception)
  async def server_error(_: Request, err: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", None, "server_error"),
                        status_code=500)

  @app.exception_handler(RequestValidationError)
  async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
      return JSONResponse(error_body(f"the request body is not valid JSON: {first.get('msg')} "
                                     f"(at character {first.get('loc', ('', '?'))[-1]})", "body",
                                     "invalid_request_error"), status_code=400)
    # pydantic tries each member of a union; name the field, not the member type it tried
    param = ".".join(x for x in loc if not _is_type_tag(x))
    message = f"{param or 'body'}: {first.get('msg')}"
    if first.get("type") == "extra_forbidden":
      message = f"unknown or unsupported parameter {param!r}"
    elif param == "prompt" or param.startswith("prompt."):
      message = (f"{param}: the prompt is a string, a list of strings, a list of token ids or a list of lists of "
                 f"token ids ({first.get('msg')})")
    elif any(e.get("type", "").endswith("_type") for e in errors) and first.get("input") is not None:
      message += f", got {type(first.get('input')).__name__} {json.dumps(first.get('input'))[:40]}"
    return JSONResponse(error_body(message, param or "body", "invalid_request_error"), status_code=400)

  @app.get("/health")
  async def health() -> JSONResponse:
    engine = server.engine
    status = "failed" if engine.error else "draining" if engine.draining else "ok"
    body = {"status": status, "slots": engine.num_slots, "busy_slots": engine.busy_slots, "queued": engine.queued,
            "model": server.model_name} | server.info
    return JSONResponse(body, status_code=200 if status == "ok" else 503)

  @app.get("/metrics")
  async def metrics() -> PlainTextResponse:
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models() -> dict[str, Any]:
    return {"object": "list", "data": [server.model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def model(model_id: str) -> dict[str, Any]:
    server.check_model(model_id)
    return server.model_card()

  @app.get("/tokenizer_info")
  async def tokenizer_info() -> dict[str, Any]:
    tok = server.tokenizer
    return {"tokenizer_class": "SentencePiece", "eos_token": tok.id_to_piece(tok.eos_id), "eos_token_id": tok.eos_id,
            "bos_token": None, "pad_token": None, "model_max_length": server.context, "vocab_size": tok.vocab_size,
            "sha256": tok.sha256}

  @app.post("/tokenize")
  async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
    """vLLM's: the EOS text (`</s>`) reads as the EOS id, as Hugging Face tokenizers read special tokens;
    add_special_tokens puts the EOS first, as the completions endpoint does."""
    server.check_model(body.model)
    tok = server.tokenizer
    eos_text = tok.id_to_piece(tok.eos_id)
    pieces = check_unicode(body.prompt, "prompt").split(eos_text)
    ids = [tok.eos_id] if body.add_special_tokens else []
    for i, piece in enumerate(pieces):
      ids += ([tok.eos_id] if i else []) + (tok.encode(piece) if piece else [])
    return {"count": len(ids), "max_model_len": server.context, "tokens": ids}

  @app.post("/detokenize")
  async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
    server.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < server.tokenizer.vocab_size]
    if bad:
      raise ApiError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
    return {"prompt": server.tokenizer.decode(body.tokens)}

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, http_request: Request):
    server.check_model(body.model)
    body.check()
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
      values = [body.prompt]
    else:
      values = body.prompt
    if not values:
      raise ApiError(400, "prompt is an empty list", "prompt")
    if body.max_tokens == 0 and not body.echo:
      raise ApiError(400, "max_tokens=0 asks for nothing; it is allowed with echo (the prompt's log-probabilities)",
                     "max_tokens")
    prompts = [server.prompt(v, "prompt" if len(values) == 1 else f"prompt[{i}]") for i, v in enumerate(values)]
    budgets = [server.token_budget(p.ids, body.max_tokens, "prompt") for p in prompts]
    requests = _sequence_requests(prompts, budgets, body, body.stop_strings(), logprobs=body.logprobs,
                                  echo=body.echo and body.logprobs is not None)
    return await _respond(server, "text_completion", f"cmpl-{uuid.uuid4().hex}", requests, prompts, body,
                          http_request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, http_request: Request):
    server.check_model(body.model)
    body.check()
    if body.top_logprobs is not None and not body.logprobs:
      raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    prompt = Prompt(server.encode(render_chat(body.messages), "messages"), "", 1)
    max_tokens, field = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                         else (body.max_tokens, "max_tokens"))
    if max_tokens == 0:
      raise ApiError(400, f"{field} must be at least 1", field)
    budget = server.token_budget(prompt.ids, max_tokens, "messages", field)
    requests = _sequence_requests([prompt], [budget], body, body.stop_strings() + (CHAT_STOP,),
                                  logprobs=body.top_logprobs or 0 if body.logprobs else None)
    return await _respond(server, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}", requests, [prompt], body,
                          http_request, chat=True)

  app.add_middleware(MetricsAndDrain, server=server, routes=(
      "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
      "/tokenizer_info"))
  return app


def _is_type_tag(x: str) -> bool:
  """A union member's name in a pydantic error location ("str", "list[int]", "function-after[...]")."""
  return x[:1].isupper() or "[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none")


class Choice:
  """One choice being assembled: its text, the logprobs of what it sent, and the offset of its next token."""

  def __init__(self, server: Server, prompt: Prompt, echo: bool):
    self.server, self.prompt, self.echo = server, prompt, echo
    self.text, self.tokens, self.reason = "", 0, None
    self.entries: list[TokenLogprob] = []
    self.offset = 0
    self.started = False

  def take(self, event: Event) -> tuple[str, list[TokenLogprob]]:
    """The text and logprob entries this event adds to the choice (the echoed prompt first)."""
    text, entries = event.text, list(event.logprobs)
    if self.echo and not self.started:
      text = self.prompt.text + text
      entries = list(event.prompt_logprobs or ())[self.prompt.shown_from:] + entries
    self.started = True
    self.text += text
    self.entries += entries
    self.tokens = event.completion_tokens
    self.reason = event.finish_reason or self.reason
    return text, entries

  def completion_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
    out = self.server.completion_logprobs(entries, self.offset)
    self.offset += sum(len(t) for t in out["tokens"])
    return out


async def _respond(server: Server, kind: str, response_id: str, requests: list[SequenceRequest],
                   prompts: list[Prompt], body: SamplingFields, http_request: Request, *, chat: bool):
  sequences: list = []
  events = _collect(server.engine, requests, None if body.stream else http_request, sequences)
  head = {"id": response_id, "created": int(time.time()), "model": server.model_name}
  echo = bool(getattr(body, "echo", False))
  choices = [Choice(server, prompts[i // body.n], echo) for i in range(len(requests))]
  if body.stream:
    first = await _first_event(events)  # errors (429, 503) before the stream starts become status codes
    return StreamingResponse(_stream(server, head, kind, first, events, sequences, choices, prompts, body, chat),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
  async for index, event in events:
    choices[index].take(event)
  if any(c.reason is None for c in choices):  # the client went away
    return JSONResponse(error_body("client disconnected", None, "client_closed"), status_code=499)
  out = []
  wants_logprobs = requests[0].logprobs is not None
  for i, c in enumerate(choices):
    if chat:
      logprobs = ({"content": server.chat_logprobs(c.entries, body.top_logprobs or 0), "refusal": None}
                  if wants_logprobs else None)
      out.append({"index": i, "message": {"role": "assistant", "content": c.text.lstrip()}, "finish_reason": c.reason,
                  "logprobs": logprobs})
    else:
      out.append({"index": i, "text": c.text, "finish_reason": c.reason,
                  "logprobs": c.completion_logprobs(c.entries) if wants_logprobs else None})
  return head | {"object": kind, "choices": out, "usage": _usage(prompts, [c.tokens for c in choices])}


async def _first_event(events: AsyncIterator[tuple[int, Event]]) -> tuple[int, Event] | None:
  try:
    return await events.__anext__()
  except StopAsyncIteration:
    return None


async def _stream(server: Server, head: dict[str, Any], kind: str, first: tuple[int, Event] | None,
                  events: AsyncIterator[tuple[int, Event]], sequences: list, choices: list[Choice],
                  prompts: list[Prompt], body: SamplingFields, chat: bool) -> AsyncIterator[str]:
  chunk_kind = "chat.completion.chunk" if chat else kind
  wants_logprobs = bool(sequences) and sequences[0].request.logprobs is not None
  role_sent = [False] * len(choices)

  def chunk(index: int, text: str, entries: list[TokenLogprob], reason: str | None) -> dict[str, Any]:
    c = choices[index]
    if chat:
      delta: dict[str, Any] = {} if reason and not text else {"content": text}
      if not role_sent[index]:
        delta["role"] = "assistant"
      logprobs = ({"content": server.chat_logprobs(entries, body.top_logprobs or 0), "refusal": None}
                  if wants_logprobs else None)
      choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    else:
      choice = {"index": index, "text": text, "finish_reason": reason,
                "logprobs": c.completion_logprobs(entries) if wants_logprobs else None}
    role_sent[index] = True
    return head | {"object": chunk_kind, "choices": [choice]}

  try:
    pending = [first] if first is not None else []

    async def all_events():
      for item in pending:
        yield item
      async for item in events:
        yield item
    for_lstrip = [chat] * len(choices)
    async for index, event in all_events():
      text, entries = choices[index].take(event)
      if for_lstrip[index]:
        text = text.lstrip()
        for_lstrip[index] = not text
      if text or entries or event.finish_reason:
        yield _sse(chunk(index, text, entries, event.finish_reason))
    if body.stream_options is not None and body.stream_options.include_usage:
      yield _sse(head | {"object": chunk_kind, "choices": [],
                         "usage": _usage(prompts, [c.tokens for c in choices])})
    yield _sse("[DONE]")
  except ApiError as err:  # the drain ran out, the engine failed: a last error event, as OpenAI streams errors
    yield _sse(error_body(err.message, err.param, err.kind))
  finally:
    for seq in sequences:  # the client left or the stream ended: free the slots now
      seq.cancel()
