"""`occrt serve`: an OpenAI-compatible HTTP server for one `.occ` model (Starlette on uvicorn, the `serve` extra).

    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions, /v1/completions     with or without "stream" (server-sent events, then [DONE])

Request and response bodies: occrt/openai_protocol.py. How requests share the model:

    admitted  <= parallel + queue      any request beyond that gets 503 at once (code "server_overloaded")
    running   <= parallel              each in a worker thread; the model's lock interleaves them token by token
    waiting   = admitted - running     queued in arrival order for a slot (a streaming one already has its headers)

A client that disconnects, mid-stream or while queued, stops its generation at the next token and frees its place.
The server binds to loopback unless told otherwise; with an API key (`--api-key` or $OCCRT_API_KEY) every request
must carry `Authorization: Bearer KEY` (else 401).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import sys
import threading
from typing import Any, AsyncIterator, Callable

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from occrt.api import Model
from occrt.completion import Completion, CompletionStream
from occrt.errors import OccError
from occrt.openai_protocol import (APIError, GenerationRequest, bad, chunk_body, model_body, new_id, now,
                                   parse_json_body, parse_request, response_body, sse, usage_chunk_body)

DEFAULT_PARALLEL = 4
DEFAULT_QUEUE = 16
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context window of today's small models
CHAT_DEFAULT_MAX_TOKENS = 256  # when neither the request nor the file's generation defaults say
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Admission:
    """At most `parallel` requests generate at once and `queue` more wait; the rest are refused at once (503).

    Used from the event loop only, so the counter needs no lock; the slots are an anyio semaphore (FIFO)."""

    def __init__(self, parallel: int, queue: int):
        if parallel < 1 or queue < 0:
            raise ValueError(f"parallel must be >= 1 and queue >= 0, got {parallel}, {queue}")
        self.parallel = parallel
        self.limit = parallel + queue
        self.admitted = 0
        self._slots: anyio.Semaphore | None = None  # made inside the event loop

    def admit(self) -> Callable[[], None]:
        """Count a request in, or raise 503. Returns its release function (safe to call twice)."""
        if self.admitted >= self.limit:
            raise APIError(503, f"the server is busy ({self.parallel} requests running, "
                           f"{self.limit - self.parallel} waiting); retry later",
                           type="server_error", code="server_overloaded")
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1
        return release

    @property
    def slots(self) -> anyio.Semaphore:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.parallel)
        return self._slots


class OpenAIServer:
    def __init__(self, model: Model, *, model_id: str, api_key: str | None = None,
                 parallel: int = DEFAULT_PARALLEL, queue: int = DEFAULT_QUEUE,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.model = model
        self.model_id = model_id
        self._key = api_key.encode("utf-8") if api_key else None
        self.admission = Admission(parallel, queue)
        self.max_body_bytes = max_body_bytes
        self.created = _file_time(model)

    def app(self) -> Starlette:
        routes = [Route("/v1/models", self.list_models, methods=["GET"]),
                  Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        handlers: dict[Any, Callable] = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- endpoints --------------------------------------------------------------------------------------------------
    async def list_models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [model_body(self.model_id, self.created)]})

    async def get_model(self, request: Request) -> JSONResponse:
        self._authorize(request)
        self._check_model(request.path_params["model_id"], param=None)
        return JSONResponse(model_body(self.model_id, self.created))

    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    # -- one generation request -------------------------------------------------------------------------------------
    async def _generate(self, request: Request, kind: str):
        self._authorize(request)
        req = parse_request(parse_json_body(await self._read_body(request)), kind)
        self._check_model(req.model)
        release = self.admission.admit()
        try:
            stream = await anyio.to_thread.run_sync(self._start, req)
        except BaseException:
            release()
            raise
        rid, created = new_id(kind), now()
        if req.stream:
            return EventStream(self._events(req, stream, rid, created), on_close=release)
        try:
            done = await self._run_to_end(request, stream)
        finally:
            release()
        if done is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        return JSONResponse(response_body(kind, rid, created, self.model_id, done))

    def _start(self, req: GenerationRequest) -> CompletionStream:
        """Tokenize and check the request (in a worker thread: the chat template and tokenizer take CPU time);
        returns the stream, which has done no model work yet."""
        model = self.model
        try:
            if req.kind == "chat":
                ids, what = model.chat_prompt_ids(req.messages), "messages"
            else:
                ids = (model.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt)
                what = "prompt"
        except OccError as e:  # a chat template's raise_exception, or no template at all
            raise bad(str(e), "messages") from None
        if isinstance(req.prompt, list) and not all(0 <= t < model.config.vocab_size for t in ids):
            raise bad(f"prompt token ids must be in [0, {model.config.vocab_size})", "prompt", "invalid_value")
        context = model.context_length
        room = context - len(ids)  # new tokens that fit after the prompt
        if req.max_tokens is not None and req.max_tokens > room or room < 1:
            asked = req.max_tokens or 1
            raise bad(f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{len(ids) + asked} tokens ({len(ids)} in the {what}, {asked} in the completion). "
                      f"Please reduce the length of the {what} or completion.", what, "context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            default = (COMPLETION_DEFAULT_MAX_TOKENS if req.kind == "completion" else
                       model.generation_defaults.get("max_new_tokens", CHAT_DEFAULT_MAX_TOKENS))
            max_tokens = min(default, room)
        temperature = req.temperature
        if temperature is None:
            temperature = model.generation_defaults.get("temperature", 1.0)
        top_p = req.top_p
        if top_p == 0:  # all the mass on the most likely token: greedy
            temperature, top_p = 0.0, None
        try:
            return model.complete(ids, stream=True, max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, top_k=req.top_k, seed=req.seed, stop=req.stop)
        except ValueError as e:
            raise bad(str(e)) from None

    async def _run_to_end(self, request: Request, stream: CompletionStream) -> Completion | None:
        """Generate the whole text in a worker thread once a slot is free; None if the client disconnects first."""
        gone = threading.Event()
        done = None
        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await _wait_disconnect(request.receive)
                    gone.set()
                    tg.cancel_scope.cancel()
                tg.start_soon(watch)
                async with self.admission.slots:
                    done = await anyio.to_thread.run_sync(_drain, stream, gone)
                tg.cancel_scope.cancel()
            return done
        finally:
            stream.close()

    async def _events(self, req: GenerationRequest, stream: CompletionStream, rid: str, created: int
                      ) -> AsyncIterator[bytes]:
        kind, model_id = req.kind, self.model_id
        try:
            async with self.admission.slots:
                if kind == "chat":
                    yield sse(chunk_body(kind, rid, created, model_id, first=True))
                while True:
                    try:
                        piece = await anyio.to_thread.run_sync(next, stream, None)
                    except Exception as e:  # headers are sent: report in the stream, as OpenAI does
                        yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
                        return
                    if piece is None:
                        break
                    yield sse(chunk_body(kind, rid, created, model_id, text=piece))
                yield sse(chunk_body(kind, rid, created, model_id, finish_reason=stream.finish_reason))
                if req.include_usage:
                    yield sse(usage_chunk_body(kind, rid, created, model_id, stream.prompt_tokens,
                                               stream.completion_tokens))
                yield sse("[DONE]")
        finally:
            stream.close()

    # -- checks -----------------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def _check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_id:
            raise APIError(404, f"The model '{name[:100]}' does not exist; this server serves '{self.model_id}'.",
                           param=param, code="model_not_found")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        return bytes(body)


class EventStream:
    """An ASGI response of server-sent events from an async iterator of bytes. It listens for the client's
    disconnect the whole time (also while the request waits for a slot), stops the iterator then, and calls
    `on_close` exactly once however it ends."""

    def __init__(self, events: AsyncIterator[bytes], *, on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        headers += [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        try:
            async with anyio.create_task_group() as tg:
                async def produce() -> None:
                    try:
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                        async for chunk in self.events:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:
                        pass  # the client went away while we wrote
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await _wait_disconnect(receive)
                    tg.cancel_scope.cancel()
                tg.start_soon(produce)
                tg.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
            self.on_close()


def _drain(stream: CompletionStream, gone: threading.Event) -> Completion | None:
    for _ in stream:
        if gone.is_set():
            return None
    return stream.completion


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"retry-after": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message, code = f"Unknown path {request.url.path[:200]!r}; this server has /v1/models, " \
                        f"/v1/chat/completions and /v1/completions.", "unknown_url"
    elif exc.status_code == 405:
        message, code = f"Method {request.method} is not allowed on {request.url.path[:200]!r}.", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(APIError(500, "The server had an error while processing your request.",
                                 type="server_error").body(), status_code=500)


def _file_time(model: Model) -> int:
    try:
        return int(os.path.getmtime(model.file.path))
    except (OSError, TypeError):
        return now()


def create_app(model: Model, *, model_id: str, api_key: str | None = None, parallel: int = DEFAULT_PARALLEL,
               queue: int = DEFAULT_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `model` under the name `model_id` (for embedding in another ASGI server)."""
    return OpenAIServer(model, model_id=model_id, api_key=api_key, parallel=parallel, queue=queue,
                        max_body_bytes=max_body_bytes).app()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free port, which the caller reads back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise OccError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(path: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_id: str | None = None, device: str = "cpu", parallel: int = DEFAULT_PARALLEL,
          queue: int = DEFAULT_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, access_log: bool = True) -> None:
    """Load `path` and serve it until interrupted. Prints the address it listens on to stderr first."""
    import occrt

    model = occrt.load(path, device=device)
    model_id = model_id or os.path.splitext(os.path.basename(path))[0]
    app = create_app(model, model_id=model_id, api_key=api_key, parallel=parallel, queue=queue,
                     max_body_bytes=max_body_bytes)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host) and not api_key:
        print(f"occrt: warning: listening on {host}, reachable from other machines, without an API key",
              file=sys.stderr)
    print(f"occrt: serving {model_id!r} at http://{shown}:{bound}/v1 ({parallel} at once, {queue} queued)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        model.close()
