"""The HTTP side of `pecca serve`: OpenAI's routes on Starlette, the engine behind them.

    GET  /health                 the engine's state (open without the API key)
    GET  /v1/models              the one model served
    POST /v1/completions         a prompt, continued
    POST /v1/chat/completions    messages, rendered with the model's chat template

Both POST routes answer one JSON object, or with "stream": true server-sent events in
OpenAI's chunk format ending with `data: [DONE]`. The asyncio side only parses, tokenizes
(in a worker thread, so a large prompt does not stall other clients) and relays: the engine
thread does the model's work, and a client that disconnects has its job cancelled, which frees
its slot before the engine's next step.
"""
import asyncio
import json
import os
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

from pecca.chat_template import ChatTemplate, chat_ids
from pecca.errors import ChatTemplateError, PeccaError
from pecca.generate import prompt_tokens
from pecca.serve import protocol as P
from pecca.serve.engine import EngineClosedError, Engine, Job, QueueFullError

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a long context's prompt is well under 1 MB of text


class PeccaServer:
    """An LLM behind OpenAI's routes. `app` is the ASGI application; `start()` starts the
    engine thread, `close()` stops it. `run(host, port)` serves with uvicorn until stopped.

    llm: a pecca.LLM. parallel: KV-cache slots (sequences decoding together). ctx_size: positions
    per slot (default: the model's context, at most 4096). api_key: when set, /v1 routes need
    `Authorization: Bearer <api_key>`. model_name: the id clients name (default: the file's stem).
    chat_template: a template file or Jinja source instead of the model's own.
    max_queue: requests that may wait for a slot before the server answers 503.
    """

    def __init__(self, llm, parallel: int = 4, ctx_size: Optional[int] = None, api_key: Optional[str] = None,
                 model_name: Optional[str] = None, chat_template: Optional[str] = None,
                 max_queue: Optional[int] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.llm = llm
        self.engine = Engine(llm, parallel, ctx_size, max_queue)
        self.api_key = api_key or None
        self.model_name = model_name or default_model_name(llm.loaded.path)
        self.max_request_bytes = int(max_request_bytes)
        self._mailboxes = weakref.WeakKeyDictionary()  # event loop -> Mailbox
        self._max_piece = None  # the longest vocabulary entry, in bytes (see check_chars)
        self.created = P.now()
        self.template, self.template_error = None, None
        try:
            self.template = ChatTemplate.for_tokenizer(llm.tokenizer, chat_template)
        except ChatTemplateError as e:  # completions still work; chat answers this error
            if chat_template is not None:
                raise
            self.template_error = str(e)
        # tokenizing and template rendering, off the event loop, one at a time
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="pecca-tokenize")
        self.app = build_app(self)

    @classmethod
    def load(cls, model: str, threads: Optional[int] = None, tokenizer: Optional[str] = None,
             kv_type: str = "f32", **kwargs):
        """Open MODEL (a file or known name) with pecca.load and serve it (the slots' caches of
        `kv_type`, as pecca.load's)."""
        import pecca

        # ctx=1: the LLM's own KV cache goes unused (each slot has its own), so keep it tiny
        llm = pecca.load(model, threads=threads, tokenizer=tokenizer, ctx=1, kv_type=kv_type)
        return cls(llm, **kwargs)

    def start(self) -> "PeccaServer":
        self.engine.start()
        return self

    def close(self) -> None:
        self.engine.close()
        self.cpu.shutdown(wait=False)

    def run(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
            sock: Optional[socket.socket] = None) -> None:
        """Serve until interrupted (uvicorn; Ctrl-C stops it)."""
        import uvicorn

        sock = sock or bind(host, port)
        server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=3))
        self.start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        finally:
            self.close()

    # ---- helpers of the routes ------------------------------------------------------------

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            raise P.ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                             code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise P.ApiError(404, f"The model '{name}' does not exist; this server serves "
                                  f"'{self.model_name}'", "model", "model_not_found")

    async def read_json(self, request) -> dict:
        """The request body as a JSON object: 413 past max_request_bytes (read to the end, so
        that the client sees the answer rather than a reset connection), 400 if not JSON."""
        limit, size, chunks = self.max_request_bytes, 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 64 * limit:
                break
        if size > limit:
            raise P.ApiError(413, f"The request body is {size / 2**20:.1f} MiB; this server accepts "
                                  f"{limit / 2**20:.1f} MiB at most", code="request_too_large")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise P.bad(f"The request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise P.bad("The request body must be a JSON object", code="invalid_json")
        return body

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    def check_chars(self, n_chars: int, param: str) -> None:
        """Refuse, without tokenizing it, a text too long to fit the context whatever its tokens:
        no token stands for more characters than the longest vocabulary entry (twice that, for
        normalization's sake). Tokenizing costs more than linear time on some vocabularies."""
        if self._max_piece is None:
            tok = self.llm.tokenizer
            self._max_piece = max(len(tok.piece(t)) for t in range(tok.vocab_size)) or 1
        limit = 2 * self.engine.ctx * self._max_piece
        if n_chars > limit:
            raise P.bad(f"The prompt is {n_chars} characters: more than this model's context of "
                        f"{self.engine.ctx} tokens can hold", param, "context_length_exceeded")

    def completion_ids(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            return prompt_tokens(self.llm.tokenizer, prompt)
        vocab = self.llm.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise P.bad(f"token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", "prompt")
        return list(prompt)

    def chat_prompt_ids(self, messages) -> List[int]:
        if self.template is None:
            raise P.bad(f"This model has no chat template ({self.template_error}); start the server "
                        "with --chat-template FILE, or use /v1/completions", "messages")
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except PeccaError as e:
            raise P.bad(str(e), "messages") from None
        return chat_ids(self.llm.tokenizer, text)

    def check_length(self, ids: List[int], param: str) -> None:
        ctx = self.engine.ctx
        if len(ids) > ctx:
            raise P.bad(f"This model's maximum context length is {ctx} tokens; the prompt is {len(ids)} "
                        "tokens", param, "context_length_exceeded")

    def submit(self, ids: List[int], params: P.Params) -> "Relay":
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = Mailbox(loop)
        relay = Relay(mailbox)
        opts = params.options
        job = Job(ids, opts.sampler(self.llm.config.vocab_size), opts.token_limit(self.engine.ctx), opts.stop,
                  relay.sink)
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            raise P.ApiError(503, str(e), code="server_busy") from None
        except EngineClosedError as e:
            raise P.ApiError(503, str(e), code="server_shutting_down") from None
        relay.job = job
        return relay


class Relay:
    """Carries a job's events from the engine thread to the request's event loop."""

    def __init__(self, mailbox: "Mailbox"):
        self.mailbox, self.queue, self.job = mailbox, asyncio.Queue(), None

    def sink(self, event) -> None:
        self.mailbox.post(self.queue, event)

    async def events(self) -> list:
        """The events that have arrived (waiting for one), consecutive texts joined: under load
        a stream sends fewer, larger chunks instead of falling behind."""
        out = [await self.queue.get()]
        while not self.queue.empty():
            event = self.queue.get_nowait()
            if event[0] == "text" and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + event[1])
            else:
                out.append(event)
        return out


class Mailbox:
    """Events from the engine thread into one event loop: one wake-up of the loop for all the
    events of an engine step, not one per token per request."""

    def __init__(self, loop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def post(self, queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a delivery is already scheduled and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, event in items:
            queue.put_nowait(event)


def default_model_name(path: str) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port; read it from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


# ---- the routes ---------------------------------------------------------------------------

def build_app(server: PeccaServer):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error_response(e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def route(fn, key=True):
        async def handler(request):
            try:
                if key:
                    server.check_key(request)
                return await fn(request)
            except P.ApiError as e:
                return error_response(e)
        return handler

    async def health(request):
        return JSONResponse({"status": "ok", "model": server.model_name, "pid": os.getpid(),
                             **server.engine.status()})

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "pecca"}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        name = request.path_params["name"]
        if name != server.model_name:
            raise P.ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return JSONResponse(model_card())

    async def completions(request):
        body = await server.read_json(request)
        server.check_model(body)
        params = P.params(body, chat=False)
        ids = await server.off_loop(server.completion_ids, P.prompt(body))
        return await answer(request, ids, params, chat=False)

    async def chat_completions(request):
        body = await server.read_json(request)
        server.check_model(body)
        params = P.params(body, chat=True)
        ids = await server.off_loop(server.chat_prompt_ids, P.messages(body))
        return await answer(request, ids, params, chat=True)

    async def answer(request, ids, params: P.Params, chat: bool):
        server.check_length(ids, "messages" if chat else "prompt")
        relay = server.submit(ids, params)
        rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
        if params.stream:
            return stream(relay, rid, created, chat, params.include_usage)
        return await whole(request, relay, rid, created, chat)

    async def whole(request, relay: Relay, rid, created, chat: bool):
        pieces, checked = [], time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(relay.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.25:  # is anyone still waiting for the answer?
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it
                if event is None:
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    build = P.chat_completion if chat else P.completion
                    return JSONResponse(build(rid, server.model_name, "".join(pieces), event[1],
                                              event[2].as_dict(), created))
                else:
                    raise P.ApiError(500, event[1], code="generation_failed")
        finally:
            server.engine.cancel(relay.job)  # nothing when it ended; frees the slot when it did not

    def stream(relay: Relay, rid, created, chat: bool, include_usage: bool):
        name = server.model_name

        def chunk(**kw) -> str:
            return json.dumps((P.chat_chunk if chat else P.completion_chunk)(rid, name, created, **kw))

        # a text chunk is the same JSON every time but for its text: dumped once around a marker
        marker = "\x00pecca-text\x00"
        head, tail = chunk(**({"delta": {"content": marker}} if chat else {"text": marker})).split(json.dumps(marker))

        def render(events: list) -> Tuple[List[str], bool]:
            """The SSE data lines of these events, and whether the stream ends with them."""
            out = []
            for event in events:
                if event[0] == "text":
                    out.append(head + json.dumps(event[1]) + tail)
                    continue
                if event[0] == "done":
                    out.append(chunk(finish=event[1]))
                    if include_usage:
                        out.append(chunk(usage=event[2].as_dict()))
                elif event[0] == "error":
                    out.append(json.dumps(P.ApiError(500, event[1], code="generation_failed").body()))
                out.append("[DONE]")
                return out, True
            return out, False

        first = [chunk(delta={"role": "assistant", "content": ""})] if chat else []
        return EventStream(relay, first, render, server.engine.cancel)

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        msg = "Not found" if status == 404 else getattr(exc, "detail", "error")
        return error_response(P.ApiError(status, f"{msg}: {request.method} {request.url.path}",
                                         code="not_found" if status == 404 else None))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", route(models), methods=["GET"]),
        Route("/v1/models/{name:path}", route(model), methods=["GET"]),
        Route("/v1/completions", route(completions), methods=["POST"]),
        Route("/v1/chat/completions", route(chat_completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


class EventStream:
    """A server-sent event stream as a bare ASGI response: `first` data lines, then those `render`
    makes of each batch of the relay's events, all of a batch in one write, until `render` says
    the stream ended. A task waits for the client's disconnect meanwhile; then, or when the
    stream ends in any way, `cancel(relay.job)` frees the job's slot (nothing if it is done).

    (sse-starlette's EventSourceResponse did the same with a cancel scope and an event object per
    chunk: ~0.6 ms of the HTTP thread's time per token, which the engine thread then waited for
    the GIL.)"""

    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, relay: Relay, first: List[str], render, cancel):
        self.relay, self.first, self.render, self.cancel = relay, first, render, cancel

    async def __call__(self, scope, receive, send) -> None:
        relay = self.relay
        gone = asyncio.ensure_future(self._client_gone(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            lines, ended = self.first, False
            while True:
                if lines:
                    body = "".join(f"data: {line}\n\n" for line in lines).encode()
                    await send({"type": "http.response.body", "body": body, "more_body": not ended})
                if ended:
                    break
                events = await relay.events()
                if any(e[0] == "gone" for e in events):
                    return
                lines, ended = self.render(events)
        except OSError:  # the connection broke under a write
            pass
        finally:
            gone.cancel()
            self.cancel(relay.job)

    async def _client_gone(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel(self.relay.job)  # the slot is free before the engine's next step
        self.relay.queue.put_nowait(("gone",))


class BackgroundServer:
    """A PeccaServer served by uvicorn in a thread (tests, notebooks): `url`, `stop()`.

        with BackgroundServer(PeccaServer.load("stories260K")) as bg:
            openai.OpenAI(base_url=bg.url + "/v1", api_key="x") ...
    """

    def __init__(self, server: PeccaServer, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = server
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "BackgroundServer":
        self.server.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
