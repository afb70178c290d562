"""The OpenAI HTTP API as occrt's server speaks it: request bodies checked into `GenerationRequest`, response and
stream-chunk bodies, and error bodies. No server library here: this module is plain data in, plain data out.

Requests (`POST /v1/chat/completions`, `POST /v1/completions`):
    model                       required; must name the served model (else 404, code "model_not_found")
    messages                    chat: a non-empty list of {"role": str, "content": str | [{"type": "text", ...}] | null}
    prompt                      completions: a string, or token ids; one prompt per request
    max_tokens                  >= 1; chat also takes `max_completion_tokens`. Default: chat, the model's
                                generation default (256 if the file gives none); completions, 16 (OpenAI's default);
                                either way cut to what fits the context. Asking for more than fits is a 400
                                (code "context_length_exceeded"), as is a prompt that fills the context.
    temperature                 [0, 2]; 0 is greedy. Default: the model's generation default, else 1 (OpenAI's)
    top_p                       [0, 1]; 0 means only the most likely token (greedy). Default: the model's, else 1
    top_k                       an extension (as vLLM and llama.cpp accept it): >= 0, 0 is off
    stop                        a string or up to 4 strings of at most 256 characters; not included in the text
    seed                        an integer: the same seed and request give the same text
    stream, stream_options      server-sent events, `data: [DONE]` at the end; {"include_usage": true} adds a last
                                chunk with the usage and no choices
    n                           1 only. Options occrt cannot honour (logprobs, echo, best_of > 1, suffix, tools,
                                penalties, logit_bias, a response_format other than text) are a 400 when set to
                                anything but their neutral value, rather than being silently ignored; other fields
                                (user, metadata, ...) are ignored.

Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status of the OpenAI API: 400 bad request,
401 bad or missing key, 404 unknown model or path, 405 method, 413 body too large, 503 overloaded, 500 internal.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from occrt.completion import Completion

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # a stop string holds back that many characters of the stream while it may still be forming
# seeds are reduced to 64 bits: numpy's generator takes any non-negative integer, OpenAI's API any 64-bit one
SEED_MASK = (1 << 64) - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict[str, Any]] | None  # chat: [{"role", "content": str}]
    prompt: str | list[int] | None  # completion
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_json_body(raw: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                  "your HTTP library correctly. The OpenAI API expects a JSON payload.)", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    return doc


def parse_request(body: dict[str, Any], kind: str) -> GenerationRequest:
    """Check a `/v1/chat/completions` (kind "chat") or `/v1/completions` (kind "completion") body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter (a string)", "model", "missing_required_parameter")
    _refuse_unsupported(body)
    stream = _optional(body, "stream", _is_bool, "a boolean") or False
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    include_usage = bool(options and _optional(options, "include_usage", _is_bool, "a boolean", "stream_options."))
    if kind == "chat":
        messages, prompt = _messages(body.get("messages")), None
        max_tokens = _optional(body, "max_completion_tokens", _is_int, "an integer")
        if max_tokens is None:
            max_tokens = _optional(body, "max_tokens", _is_int, "an integer")
            max_name = "max_tokens"
        else:
            max_name = "max_completion_tokens"
    else:
        messages, prompt = None, _prompt(body.get("prompt"))
        max_tokens, max_name = _optional(body, "max_tokens", _is_int, "an integer"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"{max_name} must be at least 1, got {max_tokens}", max_name, "invalid_value")
    temperature = _optional(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad(f"temperature must be in [0, 2], got {temperature}", "temperature", "invalid_value")
    top_p = _optional(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 <= top_p <= 1:
        raise bad(f"top_p must be in [0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _optional(body, "top_k", _is_int, "an integer")
    if top_k is not None and top_k < 0:
        raise bad(f"top_k must be >= 0, got {top_k}", "top_k", "invalid_value")
    seed = _optional(body, "seed", _is_int, "an integer")
    return GenerationRequest(kind=kind, model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, stop=_stop(body.get("stop")),
                             seed=None if seed is None else seed & SEED_MASK, stream=stream,
                             include_usage=include_usage)


# option -> its neutral values: anything else asks for something occrt does not do
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        # equal to a neutral value, booleans apart from numbers (True == 1 in Python, not in JSON)
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            raise bad(f"{key}={json.dumps(value)[:60]} is not supported by this server", key, "unsupported_value")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages",
                  "missing_required_parameter" if value is None else "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"{where}.role must be a non-empty string", f"{where}.role", "invalid_type")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                          f"{where}[{j}]", "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string, a list of text parts, or null", where, "invalid_type")


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad("prompt is empty", "prompt", "invalid_value")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return list(value)
    if value is None:
        raise bad("you must provide a prompt parameter", "prompt", "missing_required_parameter")
    raise bad("prompt must be a string or a list of token ids (one prompt per request)", "prompt", "invalid_type")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of at most "
                  f"{MAX_STOP_CHARS} characters", "stop", "invalid_value")
    return tuple(s for s in stops if s)


def _optional(d: dict[str, Any], key: str, ok, what: str, prefix: str = "") -> Any:
    value = d.get(key)
    if value is not None and not ok(value):
        raise bad(f"{prefix}{key} must be {what}, got {json.dumps(value)[:60]}", prefix + key, "invalid_type")
    return value


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- responses ------------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, rid: str, created: int, model: str, done: Completion) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                  "logprobs": None, "finish_reason": done.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(done.prompt_tokens, done.completion_tokens)}


def chunk_body(kind: str, rid: str, created: int, model: str, *, text: str | None = None, first: bool = False,
               finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk. Chat: the first carries the role, then text deltas, the last an empty delta with the
    finish_reason. Completions: text pieces, the last with the finish_reason."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk_body(kind: str, rid: str, created: int, model: str, prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_body(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "occrt"}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"
