"""POST /v1/responses on the chat core: a Responses request is translated into the Chat Completions request it
means (then checked, rendered and generated exactly like one), and the finished ChatReply is laid out as a
Response: `reasoning`, `function_call` and `message` output items. Non-streaming only.

Input items: a string (one user message); messages {"role", "content": a string or input_text/output_text
parts}; {"type": "function_call", "call_id", "name", "arguments"} (an earlier call of the model) and
{"type": "function_call_output", "call_id", "output"} (its result); {"type": "reasoning"} items with
reasoning_text content (kept with the next assistant turn, as harmony keeps it until the final answer).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from gptoss_stream.server.protocol import bad_request
from gptoss_stream.server.replies import ChatReply

SAMPLING_FIELDS = ("model", "temperature", "top_p", "seed", "n", "logprobs", "top_logprobs", "presence_penalty",
                   "frequency_penalty", "logit_bias")


def chat_body(body: dict) -> dict:
    """The Chat Completions body equivalent to a Responses body."""
    if body.get("stream"):
        raise bad_request("streaming is not supported on /v1/responses: use /v1/chat/completions with "
                          "stream: true", "stream")
    if body.get("previous_response_id") is not None:
        raise bad_request("'previous_response_id' is not supported: this server stores no responses; send the "
                          "whole conversation in 'input'", "previous_response_id")
    chat: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise bad_request(f"'max_output_tokens' must be an integer >= 1, got {limit!r}", "max_output_tokens")
        chat["max_completion_tokens"] = limit
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad_request("'reasoning' must be an object like {\"effort\": \"low\"}", "reasoning")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be an array of function tools", "tools")
        chat["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if "tool_choice" in body:
        chat["tool_choice"] = body["tool_choice"]
    messages = []
    if body.get("instructions") is not None:
        messages.append({"role": "developer", "content": body["instructions"]})
    messages += _messages(body.get("input"))
    chat["messages"] = messages
    return chat


def _tool(tool: Any, param: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request("only function tools are supported: {\"type\": \"function\", \"name\", \"parameters\"}",
                          param)
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request("content must be a string or an array of input_text/output_text parts (gpt-oss reads "
                      "text only)", param)


def _messages(items: Any) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty array of input items", "input")
    messages: list[dict] = []
    reasoning: list[str] = []  # reasoning items, kept for the assistant turn they precede
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            message = {"role": role, "content": _text(item.get("content"), f"{param}.content")}
            if role == "assistant" and reasoning:
                message["reasoning_content"] = "".join(reasoning)
                reasoning = []
            messages.append(message)
        elif kind == "reasoning":
            reasoning += [part.get("text", "") for part in item.get("content") or [] if isinstance(part, dict)]
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call],
                                 "reasoning_content": "".join(reasoning) or None})
                reasoning = []
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output"), f"{param}.output")})
        else:
            raise bad_request(f"input item type {kind!r} is not supported (message, reasoning, function_call, "
                              "function_call_output are)", param)
    return messages


def response_object(model: str, reply: ChatReply, finish_reason: str, usage: dict, body: dict) -> dict:
    output: list[dict] = []
    if reply.reasoning:
        output.append({"type": "reasoning", "id": f"rs_{secrets.token_hex(12)}", "summary": [],
                       "content": [{"type": "reasoning_text", "text": reply.reasoning}]})
    for call in reply.tool_calls:
        output.append({"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": call.id,
                       "name": call.name, "arguments": call.arguments, "status": "completed"})
    if reply.content or not reply.tool_calls:
        output.append({"type": "message", "id": f"msg_{secrets.token_hex(12)}", "role": "assistant",
                       "status": "completed",
                       "content": [{"type": "output_text", "text": reply.content, "annotations": []}]})
    incomplete = finish_reason == "length"
    return {
        "id": f"resp_{secrets.token_hex(12)}", "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None, "model": model, "output": output,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
        "reasoning": body.get("reasoning"), "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"), "parallel_tool_calls": False, "metadata": {},
        "text": {"format": {"type": "text"}},
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"],
        },
    }
