"""The OpenAI HTTP API over the engine: /v1/completions, /v1/chat/completions, /v1/models, /health.

FastAPI validates request bodies with the pydantic models below; any invalid request gets a
400 in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the field (a malformed JSON body: `param` "body"). A full queue gets 429, a server that
is shutting down 503. Streaming answers are server-sent events (`data: {chunk}` lines, then
`data: [DONE]`), as OpenAI's clients read them. A client that goes away cancels its sequences,
which frees their slots before the engine's next step.

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
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from neon_qtg_jax.serving.engine import Draining, Engine, Event, QueueFull, SequenceRequest

CHAT_STOP = "\nUser:"
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid")
  include_usage: bool = False


class SamplingFields(BaseModel):
  """Fields both endpoints share. Unknown fields are rejected (400 naming them), as OpenAI does."""
  model_config = ConfigDict(extra="forbid")
  model: str | None = None
  max_tokens: int | None = Field(default=None, ge=1)
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

  def stop_strings(self) -> tuple[str, ...]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
      raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


class CompletionRequest(SamplingFields):
  prompt: str | list[str]


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="forbid")
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[dict[str, Any]]
  name: str | None = None

  def text(self, index: int) -> str:
    if isinstance(self.content, str):
      return self.content
    parts = []
    for part in self.content:
      if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ApiError(400, "only text content parts are supported", f"messages[{index}].content")
      parts.append(part["text"])
    return "".join(parts)


class ChatRequest(SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)


def render_chat(messages: list[ChatMessage]) -> str:
  """The documented template: system text, then "User: ..." / "Assistant: ..." lines, ending "Assistant:"."""
  system = [m.text(i) for i, m in enumerate(messages) if m.role in ("system", "developer")]
  lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.text(i)}" for i, m in enumerate(messages)
           if m.role in ("user", "assistant")]
  return "".join(s + "\n\n" for s in system) + "\n".join(lines + ["Assistant:"])


class Server:
  """What the endpoints need: the engine, the tokenizer and the limits."""

  def __init__(self, engine: Engine, tokenizer, *, model_name: str, default_max_tokens: int,
               info: dict[str, Any] | None = None):
    self.engine, self.tokenizer = engine, tokenizer
    self.model_name, self.default_max_tokens = model_name, default_max_tokens
    self.context = engine.context
    self.info = info or {}
    self.created = int(time.time())

  def encode(self, text: str) -> list[int]:
    """EOS + tokens: the separator the training stream puts before every document."""
    return [self.tokenizer.eos_id] + self.tokenizer.encode(text)

  def token_budget(self, prompt_ids: list[int], max_tokens: int | None, prompt_field: str,
                   max_field: str = "max_tokens") -> int:
    room = self.context - len(prompt_ids)
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
  except QueueFull as err:
    raise ApiError(429, str(err), None, "rate_limit_exceeded") from None
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
        raise ApiError(503, f"the request was cancelled: {engine.error or 'the server is shutting down'}", None,
                       "server_unavailable")
      if event.finish_reason is not None:
        open_choices -= 1
      yield index, event
  finally:
    for seq in sequences:
      seq.cancel()
    engine.wake()


def _sequence_requests(prompts: list[list[int]], budgets: list[int], body: SamplingFields,
                       stop: tuple[str, ...]) -> list[SequenceRequest]:
  seed = body.seed if body.seed is not None else secrets.randbits(31)
  out = []
  for p, (ids, budget) in enumerate(zip(prompts, budgets)):
    for c in range(body.n):
      out.append(SequenceRequest(ids, budget, body.temperature, body.top_p, stop, seed, choice=p * body.n + c,
                                 ignore_eos=body.ignore_eos))
  return out


def _usage(prompts: list[list[int]], tokens: list[int]) -> dict[str, int]:
  prompt_tokens = sum(len(p) for p in prompts)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(tokens),
          "total_tokens": prompt_tokens + sum(tokens)}


def _sse(payload: dict[str, Any] | str) -> str:
  return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(server: Server) -> FastAPI:
  app = FastAPI(title="neon_qtg", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.server = server

  @app.exception_handler(ApiError)
  async def api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.param, err.kind), status_code=err.status)

  @app.exception_handler(RequestValidationError)
  async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
      return JSONResponse(error_body(f"the request body is not valid JSON: {first.get('msg')} "
                                     f"(at character {first.get('loc', ('', '?'))[-1]})", "body",
                                     "invalid_request_error"), status_code=400)
    # pydantic tries each member of a union; name the field, not the member type it tried last
    param = ".".join(x for x in loc if not x[0].isupper() and x not in ("str", "list[str]", "list[dict[str,any]]"))
    message = f"{param or 'body'}: {first.get('msg')}"
    if first.get("type") == "extra_forbidden":
      message = f"unknown or unsupported parameter {param!r}"
    return JSONResponse(error_body(message, param or "body", "invalid_request_error"), status_code=400)

  @app.get("/health")
  async def health() -> JSONResponse:
    engine = server.engine
    status = "failed" if engine.error else "draining" if engine.draining else "ok"
    body = {"status": status, "slots": engine.num_slots, "busy_slots": engine.busy_slots, "queued": engine.queued,
            "model": server.model_name} | server.info
    return JSONResponse(body, status_code=200 if status == "ok" else 503)

  @app.get("/v1/models")
  async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                        "owned_by": "neon_qtg_jax"}]}

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, http_request: Request):
    server.check_model(body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
      raise ApiError(400, "prompt is an empty list", "prompt")
    prompts = [server.encode(t) for t in texts]
    budgets = [server.token_budget(p, body.max_tokens, "prompt") for p in prompts]
    requests = _sequence_requests(prompts, budgets, body, body.stop_strings())
    return await _respond(server, "text_completion", f"cmpl-{uuid.uuid4().hex}", requests, prompts, body,
                          http_request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, http_request: Request):
    server.check_model(body.model)
    prompt = server.encode(render_chat(body.messages))
    max_tokens, field = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                         else (body.max_tokens, "max_tokens"))
    budget = server.token_budget(prompt, max_tokens, "messages", field)
    requests = _sequence_requests([prompt], [budget], body, body.stop_strings() + (CHAT_STOP,))
    return await _respond(server, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}", requests, [prompt], body,
                          http_request, chat=True)

  return app


async def _respond(server: Server, kind: str, response_id: str, requests: list[SequenceRequest],
                   prompts: list[list[int]], body: SamplingFields, http_request: Request, *, chat: bool):
  sequences: list = []
  events = _collect(server.engine, requests, None if body.stream else http_request, sequences)
  head = {"id": response_id, "created": int(time.time()), "model": server.model_name}
  if body.stream:
    first = await _first_event(events)  # errors (429, 503) before the stream starts become status codes
    return StreamingResponse(_stream(head, kind, first, events, sequences, len(requests), prompts, body, chat),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
  texts = [""] * len(requests)
  tokens = [0] * len(requests)
  reasons: list[str | None] = [None] * len(requests)
  async for index, event in events:
    texts[index] += event.text
    tokens[index] = event.completion_tokens
    reasons[index] = event.finish_reason or reasons[index]
  if any(r is None for r in reasons):  # the client went away
    return JSONResponse(error_body("client disconnected", None, "client_closed"), status_code=499)
  choices = []
  for i, (text, reason) in enumerate(zip(texts, reasons)):
    if chat:
      choices.append({"index": i, "message": {"role": "assistant", "content": text.lstrip()}, "finish_reason": reason,
                      "logprobs": None})
    else:
      choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
  return head | {"object": kind, "choices": choices, "usage": _usage(prompts, tokens)}


async def _first_event(events: AsyncIterator[tuple[int, Event]]) -> tuple[int, Event] | None:
  try:
    return await events.__anext__()
  except StopAsyncIteration:
    return None


async def _stream(head: dict[str, Any], kind: str, first: tuple[int, Event] | None,
                  events: AsyncIterator[tuple[int, Event]], sequences: list, num_choices: int,
                  prompts: list[list[int]],
                  body: SamplingFields, chat: bool) -> AsyncIterator[str]:
  chunk_kind = "chat.completion.chunk" if chat else kind
  tokens = [0] * num_choices
  started = [False] * num_choices

  def chunk(index: int, text: str, reason: str | None) -> dict[str, Any]:
    if chat:
      delta: dict[str, Any] = {} if reason and not text else {"content": text}
      if not started[index]:
        delta["role"] = "assistant"
      choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
      choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
    started[index] = True
    return head | {"object": chunk_kind, "choices": [choice]}

  try:
    pending = [first] if first is not None else []
    async def all_events():
      for item in pending:
        yield item
      async for item in events:
        yield item
    for_lstrip = [chat] * num_choices
    async for index, event in all_events():
      tokens[index] = event.completion_tokens
      text = event.text
      if for_lstrip[index]:
        text = text.lstrip()
        for_lstrip[index] = not text
      if text or event.finish_reason:
        yield _sse(chunk(index, text, event.finish_reason))
    if body.stream_options is not None and body.stream_options.include_usage:
      yield _sse(head | {"object": chunk_kind, "choices": [], "usage": _usage(prompts, tokens)})
    yield _sse("[DONE]")
  except ApiError as err:
    yield _sse(error_body(err.message, err.param, err.kind))
  finally:
    for seq in sequences:  # the client left or the stream ended: free the slots now
      seq.cancel()
