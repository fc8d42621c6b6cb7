"""Chat Completions <-> harmony: requests become prompts through OpenAI's `openai-harmony` (the format's official
renderer, function tools included). Generated tokens are parsed by replies.py with our own streaming
HarmonyParser, which never raises on the malformed output a random or confused model writes (openai-harmony's
parser stops at the first token it does not expect).

The mapping, as OpenAI's and vLLM's gpt-oss servers do it:
- system and developer messages -> the developer message's instructions; tools -> its `functions` namespace;
  reasoning_effort -> the system message;
- an assistant message -> `analysis` (its reasoning_content), `commentary` to=functions.NAME (each tool call,
  content type json) and `final` (its content); a tool result -> a message from functions.NAME to the assistant;
- generated tokens are mapped back in replies.py.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from gptoss_stream.errors import SetupError
from gptoss_stream.server.protocol import ChatRequest, bad_request

FUNCTIONS = "functions."
JSON_CONTENT_TYPE = "<|constrain|>json"


@functools.lru_cache(maxsize=1)
def load_encoding():
    """openai-harmony's gpt-oss encoding. Offline it reads o200k_base.tiktoken from TIKTOKEN_ENCODINGS_BASE;
    when that is unset and TIKTOKEN_CACHE_DIR (what our tokenizer reads) holds the file, it is used."""
    try:
        import openai_harmony
    except ImportError as e:
        raise SetupError("gptoss serve needs the server extra: pip install 'gptoss-stream[server]' "
                         f"(missing {e.name})") from e
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and cache and (Path(cache) / "o200k_base.tiktoken").exists():
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = cache
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # openai-harmony raises its own HarmonyError for a missing or unreachable vocabulary
        raise SetupError(f"openai-harmony cannot load its vocabulary ({e}); offline, set TIKTOKEN_ENCODINGS_BASE "
                         "to a directory holding o200k_base.tiktoken") from e


def render_chat(request: ChatRequest, current_date: str | None = None) -> list[int]:
    """The harmony prompt (token ids) for the assistant's next reply to request.messages."""
    import openai_harmony as h

    encoding = load_encoding()
    system = h.SystemContent.new()
    if request.reasoning_effort is not None:
        system = system.with_reasoning_effort(h.ReasoningEffort(request.reasoning_effort.capitalize()))
    if current_date is not None:
        system = system.with_conversation_start_date(current_date)
    messages = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]

    instructions = [m["content"] for m in request.messages if m["role"] in ("system", "developer")]
    if instructions or request.tools:
        developer = h.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if request.tools:
            try:
                developer = developer.with_function_tools([
                    h.ToolDescription.new(t["name"], t["description"], parameters=t["parameters"])
                    for t in request.tools])
            except Exception as e:  # a schema openai-harmony cannot turn into its TypeScript-like signature
                raise bad_request(f"invalid tool definition: {e}", "tools") from e
        messages.append(h.Message.from_role_and_content(h.Role.DEVELOPER, developer))

    call_names: dict[str, str] = {}  # tool_call_id -> function name, to address each tool result
    for i, m in enumerate(request.messages):
        role, content = m["role"], m["content"]
        if role == "user":
            messages.append(h.Message.from_role_and_content(h.Role.USER, content))
        elif role == "assistant":
            if m["reasoning_content"]:
                messages.append(h.Message.from_role_and_content(h.Role.ASSISTANT, m["reasoning_content"])
                                .with_channel("analysis"))
            if m["tool_calls"]:
                if content:  # a preamble before the calls goes on the commentary channel
                    messages.append(h.Message.from_role_and_content(h.Role.ASSISTANT, content)
                                    .with_channel("commentary"))
                for call in m["tool_calls"]:
                    call_names[call["id"]] = call["name"]
                    messages.append(h.Message.from_role_and_content(h.Role.ASSISTANT, call["arguments"])
                                    .with_channel("commentary").with_recipient(FUNCTIONS + call["name"])
                                    .with_content_type(JSON_CONTENT_TYPE))
            elif content is not None:
                messages.append(h.Message.from_role_and_content(h.Role.ASSISTANT, content).with_channel("final"))
        elif role == "tool":
            name = call_names.get(m["tool_call_id"])
            if name is None:
                raise bad_request(f"tool_call_id {m['tool_call_id']!r} answers no tool call of an earlier "
                                  "assistant message", f"messages[{i}].tool_call_id")
            messages.append(h.Message.from_author_and_content(h.Author.new(h.Role.TOOL, FUNCTIONS + name), content)
                            .with_channel("commentary").with_recipient("assistant"))
    conversation = h.Conversation.from_messages(messages)
    return list(encoding.render_conversation_for_completion(conversation, h.Role.ASSISTANT))


def today() -> str:
    return time.strftime("%Y-%m-%d")
