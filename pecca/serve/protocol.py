"""OpenAI's wire format: request bodies checked and turned into pecca's options, responses and
stream chunks built, errors in OpenAI's shape.

Unknown fields are ignored, as OpenAI's API does. Fields pecca cannot honour (n > 1, logprobs,
tools, logit_bias, penalties other than pecca's repetition_penalty) are refused with a 400 that
names them, rather than silently giving something else. Sampling defaults are OpenAI's
(temperature 1, top_p 1); top_k, min_p and repetition_penalty are accepted as extensions (as
vLLM and llama.cpp's server do).
"""
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional

from pecca.errors import InvalidArgumentError
from pecca.generate import GenerationOptions
from pecca.sampling import MASK64


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(body: dict, name: str, default, minimum: Optional[int] = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {v!r}", name)
    if minimum is not None and v < minimum:
        raise bad(f"'{name}' must be >= {minimum}, got {v}", name)
    return v


def number(body: dict, name: str, default, lo: Optional[float] = None, hi: Optional[float] = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(f"'{name}' must be a number, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {v!r}", name)
    return v


def refuse_unsupported(body: dict, chat: bool) -> None:
    """400 for the fields whose meaning pecca cannot give (their neutral values pass)."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1: pecca answers one choice per request, got {n!r}", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("'best_of' is not supported", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and v != 0:
            raise bad(f"'{name}' is not supported; pecca has 'repetition_penalty' (1 = off)", name)
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"):
        v = body.get(name)
        if v not in (None, False, {}, [], ""):
            raise bad(f"'{name}' is not supported by pecca's server", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


def stop_strings(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stop) > 16:
        raise bad(f"'stop' has {len(stop)} strings; 16 at most", "stop")
    return [s for s in stop if s]  # OpenAI ignores empty stop strings


@dataclass
class Params:
    options: GenerationOptions
    stream: bool
    include_usage: bool


def params(body: dict, chat: bool) -> Params:
    """Generation options from a request body (defaults: OpenAI's). max_tokens defaults to 16
    for completions (OpenAI's) and to "until the end of the turn or the context" for chat."""
    refuse_unsupported(body, chat)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = integer(body, "max_completion_tokens", None, 0)
    else:
        max_tokens = integer(body, "max_tokens", None if chat else 16, 0)
    seed = integer(body, "seed", None)
    if seed is not None and not -(1 << 63) <= seed <= MASK64:
        raise bad(f"'seed' must fit in 64 bits, got {seed}", "seed")
    stream = boolean(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = boolean(stream_options or {}, "include_usage", False)
    try:
        opts = GenerationOptions(
            max_tokens=max_tokens,
            temperature=number(body, "temperature", 1.0, 0.0, None),
            top_p=number(body, "top_p", 1.0, 0.0, 1.0),
            top_k=integer(body, "top_k", 0, 0),
            min_p=number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=number(body, "repetition_penalty", 1.0),
            seed=None if seed is None else seed & MASK64,
            stop=stop_strings(body))
    except InvalidArgumentError as e:
        raise bad(str(e)) from None
    return Params(opts, stream, include_usage)


def messages(body: dict) -> List[dict]:
    """The chat messages, each content flattened to a string (text parts joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        out.append({**m, "content": content_text(m.get("content"), i)})
    return out


def content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def prompt(body: dict):
    """A completions prompt: a string, or a list of token ids (one prompt per request)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise bad("one prompt per request: pecca batches concurrent requests instead", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt")


# ---- responses ----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(rid: str, model: str, text: str, finish: str, usage: dict, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def chat_completion(rid: str, model: str, text: str, finish: str, usage: dict, created: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def completion_chunk(rid: str, model: str, created: int, text: str = "", finish=None, usage=None) -> dict:
    choices = [] if usage is not None else [{"index": 0, "text": text, "logprobs": None,
                                              "finish_reason": finish}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_chunk(rid: str, model: str, created: int, delta: Optional[dict] = None, finish=None,
               usage=None) -> dict:
    choices = [] if usage is not None else [{"index": 0, "delta": delta or {}, "logprobs": None,
                                              "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def now() -> int:
    return int(time.time())
