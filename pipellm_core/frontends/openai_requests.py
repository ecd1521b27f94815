"""OpenAI request bodies for `pipellm serve`, checked field by field into what the engine needs.

Every problem becomes an `APIError` with OpenAI's status, type and code, so that the server
answers it as OpenAI would and goes on serving. Fields the server does not know are ignored
(as llama-server does); known fields of the wrong type or out of range are a 400.
"""

from __future__ import annotations

from dataclasses import dataclass


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class SamplingDefaults:
    """What a request gets for the fields it leaves out (the server's -n, --temp, ... flags)."""
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class GenerationRequest:
    """A checked completion or chat-completion request."""
    chat: bool
    model: str | None
    prompt: str | list[int] | None        # completions: text or token ids
    messages: list[dict] | None           # chat: messages with string contents
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage_chunk: bool
    ignore_eos: bool = False  # llama-server's extension: generate max_tokens whatever the model says


_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and abs(v) != float("inf")


def _field(body: dict, name: str, check, what: str, default=_MISSING, nullable: bool = True):
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    if not check(value):
        raise invalid(f"'{name}' must be {what}, got {type(value).__name__} {_short(value)}", name,
                      code="invalid_type")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(name: str, value, low, high, low_open: bool = False):
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise invalid(f"'{name}' must be {bound}, got {value}", name)
    return value


def _stop(body: dict, default) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return list(default or [])
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > 16:
            raise invalid("'stop' takes at most 16 strings", "stop")
        return stop
    raise invalid("'stop' must be a string or a list of strings", "stop", code="invalid_type")


def _prompt(body: dict):
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise invalid("'prompt' is required", "prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt) and prompt:
        raise invalid("one prompt per request: send several requests (they are batched together)",
                      "prompt", code="unsupported_value")
    raise invalid("'prompt' must be a string, a list of one string, or a list of token ids",
                  "prompt", code="invalid_type")


_ROLES = ("system", "user", "assistant", "developer", "tool")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages", _MISSING)
    if messages is _MISSING or messages is None:
        raise invalid("'messages' is required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{where}' must be an object", where, code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(_ROLES)}", f"{where}.role")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text ones can be read
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid(f"'{where}.content' parts must be text parts "
                                  '({"type": "text", "text": ...})', f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise invalid(f"'{where}.content' must be a string or a list of text parts",
                          f"{where}.content", code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_generation(body, *, chat: bool, defaults: SamplingDefaults) -> GenerationRequest:
    """Check a decoded JSON body of /v1/completions (`chat` False) or /v1/chat/completions."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_type")
    model = _field(body, "model", lambda v: isinstance(v, str), "a string", None)
    n = _field(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise invalid("only 'n': 1 is supported", "n", code="unsupported_value")
    for name in ("best_of",):
        if _field(body, name, _is_int, "an integer", 1) != 1:
            raise invalid(f"only '{name}': 1 is supported", name, code="unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if _field(body, name, _is_number, "a number", 0) != 0:
            raise invalid(f"'{name}' is not supported (use 'repeat_penalty')", name, code="unsupported_value")
    if _field(body, "echo", lambda v: isinstance(v, bool), "a boolean", False):
        raise invalid("'echo' is not supported", "echo", code="unsupported_value")
    if _field(body, "logprobs", lambda v: isinstance(v, bool) or _is_int(v), "a boolean or an integer", False):
        raise invalid("'logprobs' are not supported", "logprobs", code="unsupported_value")
    if _field(body, "top_logprobs", _is_int, "an integer", 0):
        raise invalid("'top_logprobs' are not supported", "top_logprobs", code="unsupported_value")
    _field(body, "user", lambda v: isinstance(v, str), "a string", None)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    stream_options = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _field(stream_options, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)

    max_tokens = _field(body, "max_tokens", _is_int, "an integer", None)
    if chat:
        max_tokens = _field(body, "max_completion_tokens", _is_int, "an integer", max_tokens)
    max_tokens = defaults.max_tokens if max_tokens is None else _in_range("max_tokens", max_tokens, 0, None)
    temperature = _in_range("temperature", _field(body, "temperature", _is_number, "a number",
                                                  defaults.temperature), 0, None)
    top_k = _in_range("top_k", _field(body, "top_k", _is_int, "an integer", defaults.top_k), 0, None)
    top_p = _in_range("top_p", _field(body, "top_p", _is_number, "a number", defaults.top_p), 0, 1, low_open=True)
    min_p = _in_range("min_p", _field(body, "min_p", _is_number, "a number", defaults.min_p), 0, 1)
    repeat_penalty = _in_range("repeat_penalty", _field(body, "repeat_penalty", _is_number, "a number",
                                                        defaults.repeat_penalty), 0, None, low_open=True)
    seed = _field(body, "seed", _is_int, "an integer", defaults.seed)
    if seed is not None:
        _in_range("seed", seed, -2 ** 63, 2 ** 64 - 1)  # what a random generator's seed holds
    ignore_eos = _field(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    return GenerationRequest(
        chat=chat, model=model,
        prompt=None if chat else _prompt(body), messages=_messages(body) if chat else None,
        max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
        min_p=float(min_p), repeat_penalty=float(repeat_penalty), seed=seed,
        stop=_stop(body, defaults.stop), stream=stream, include_usage_chunk=include_usage,
        ignore_eos=ignore_eos)
