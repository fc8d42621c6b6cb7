"""The OpenAI API's request bodies, checked field by field, and its error objects.

Every problem with a request becomes an APIError naming the field (`param`) as OpenAI does, so a client sees
`{"error": {"message", "type", "param", "code"}}` with a 4xx status instead of a traceback. Fields we do not
implement are refused when set to anything but their default (n > 1, logprobs, penalties...), never ignored
silently; fields that change nothing here (user, metadata, store...) are accepted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Sampling:
    max_tokens: int | None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    sampling: Sampling
    tools: list[dict] = field(default_factory=list)  # [{"name", "description", "parameters"}]
    reasoning_effort: str | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    model: str
    prompt: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(body: dict) -> ChatRequest:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages", "messages")
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    tools = _tools(body)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}",
                          "reasoning_effort")
    stream = _bool(body, "stream")
    return ChatRequest(
        model=_model(body), messages=checked, sampling=_sampling(body, chat=True), tools=tools,
        reasoning_effort=effort, stream=stream, include_usage=_include_usage(body, stream),
    )


def parse_completion_request(body: dict) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    for name in ("echo", "logprobs", "suffix"):
        if body.get(name) not in (None, False):
            raise bad_request(f"'{name}' is not supported by this server", name)
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' must be 1: this server generates one completion per request", "best_of")
    stream = _bool(body, "stream")
    return CompletionRequest(model=_model(body), prompt=prompt, sampling=_sampling(body, chat=False),
                             stream=stream, include_usage=_include_usage(body, stream))


# ---------------------------------------------------------------------------- fields


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the name /v1/models lists", "model")
    return model


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return _bool(options, "include_usage")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    return value


def _sampling(body: dict, chat: bool) -> Sampling:
    if body.get("n") not in (None, 1):
        raise bad_request(f"'n' must be 1: this server generates one choice per request, got {body.get('n')!r}", "n")
    if chat and (body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None):
        raise bad_request("'logprobs' is not supported by this server", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(f"'{name}' is not supported by this server (leave it at 0)", name)
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported by this server", "logit_bias")
    response_format = body.get("response_format")
    if chat and response_format is not None and response_format != {"type": "text"}:
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported: this server does "
                          "not constrain generation", "response_format")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{name}' must be at least 1, got {max_tokens}", name)
    seed = _integer(body, "seed")
    if seed is not None and seed < 0:
        raise bad_request(f"'seed' must be >= 0, got {seed}", "seed")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        stop=_stop(body),
    )


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' must be a non-empty string or an array of up to {MAX_STOP_SEQUENCES} of them",
                          "stop")
    return stop


def text_content(content: Any, param: str, allow_none: bool = False) -> str | None:
    """A message's content as one string: a string, or an array of {"type": "text", "text"} parts."""
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"content part of type {kind!r} is not supported: gpt-oss reads text only",
                                  f"{param}.content[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request("message content must be a string or an array of text parts", f"{param}.content")


def _message(message: Any, param: str) -> dict:
    """A checked copy: role, content (a string, or None for an assistant's tool calls), and the role's fields."""
    if not isinstance(message, dict):
        raise bad_request("each message must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"message role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    out = {"role": role, "content": text_content(message.get("content"), param, allow_none=role == "assistant")}
    if role == "assistant":
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise bad_request("'reasoning_content' must be a string", f"{param}.reasoning_content")
        out["reasoning_content"] = reasoning or None
        out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{i}]")
                             for i, c in enumerate(message.get("tool_calls") or [])]
        if out["content"] is None and not out["tool_calls"]:
            raise bad_request("an assistant message needs 'content' or 'tool_calls'", f"{param}.content")
    if role == "tool":
        tool_call_id = message.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise bad_request("a tool message needs the 'tool_call_id' it answers", f"{param}.tool_call_id")
        out["tool_call_id"] = tool_call_id
    return out


def _tool_call(call: Any, param: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str) and isinstance(call.get("id"), str)):
        raise bad_request("a tool call must be {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                          "\"arguments\": a JSON string}}", param)
    return {"id": call["id"], "name": function["name"], "arguments": function["arguments"]}


def _tools(body: dict) -> list[dict]:
    """The function tools the model may call; tool_choice "none" hides them (harmony cannot force a call)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of function tools", "tools")
    checked = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t["name"] for t in checked]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return checked
    if choice == "none":
        return []
    raise bad_request("'tool_choice' must be \"auto\" or \"none\": gpt-oss's harmony format lets the model decide "
                      "whether to call a tool, so a call cannot be forced", "tool_choice")


def _tool(tool: Any, param: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request("a tool must be {\"type\": \"function\", \"function\": {\"name\", \"description\", "
                          "\"parameters\"}}", param)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise bad_request(f"a function name must be 1-64 letters, digits, _ or -, got {name!r}",
                          f"{param}.function.name")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise bad_request("a function description must be a string", f"{param}.function.description")
    parameters = function.get("parameters")
    if parameters is not None:
        _check_object_schema(parameters, f"{param}.function.parameters")
    return {"name": name, "description": description, "parameters": parameters}


def _check_object_schema(schema: Any, param: str) -> None:
    """Function parameters are a JSON Schema object: {"type": "object", "properties": {...}, "required": [...]}."""
    if not isinstance(schema, dict):
        raise bad_request("function parameters must be a JSON Schema object", param)
    if schema.get("type", "object") != "object":
        raise bad_request(f"function parameters must have type \"object\", got {schema.get('type')!r}", param)
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
        raise bad_request("'properties' must map each parameter name to a JSON Schema object", f"{param}.properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad_request("'required' must be an array of parameter names", f"{param}.required")
    missing = [r for r in required if r not in properties]
    if missing:
        raise bad_request(f"'required' names parameters that 'properties' does not define: {missing}",
                          f"{param}.required")
