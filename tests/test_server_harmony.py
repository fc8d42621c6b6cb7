"""Harmony for the server: openai-harmony (OpenAI's implementation) renders what our own harmony.py renders,
token for token, where both apply; and our streaming parser reads what openai-harmony renders for assistant
messages (reasoning, tool calls, final answers) as openai-harmony's own parser does."""

from __future__ import annotations

import pytest

h = pytest.importorskip("openai_harmony")

from server_support import TIKTOKEN_DIR  # noqa: E402  (sets TIKTOKEN_CACHE_DIR)

from gptoss_stream.chat import harmony  # noqa: E402
from gptoss_stream.chat.tokenizer import CALL, RETURN, get_tokenizer  # noqa: E402
from gptoss_stream.server.harmony_bridge import load_encoding, render_chat  # noqa: E402
from gptoss_stream.server.protocol import APIError, parse_chat_request  # noqa: E402
from gptoss_stream.server.replies import ChatReply, StopMatcher, TextReply  # noqa: E402

assert TIKTOKEN_DIR.exists()


@pytest.fixture(scope="module")
def encoding():
    return load_encoding()


def test_ours_and_openai_harmony_render_the_same_tokens(encoding):
    tok = get_tokenizer()
    ours = harmony.render_conversation([
        harmony.system_message("low", current_date="2025-06-28"),
        harmony.developer_message("Talk like a pirate."),
        harmony.Message("user", "What is 2+2?"),
        harmony.Message("assistant", "Simple sum.", channel="analysis"),
        harmony.Message("assistant", "Arr, 4."),
        harmony.Message("user", "And 3+3? Use <|end|> if you like."),
    ], tok)
    theirs = encoding.render_conversation_for_completion(h.Conversation.from_messages([
        h.Message.from_role_and_content(h.Role.SYSTEM, h.SystemContent.new().with_reasoning_effort(
            h.ReasoningEffort.LOW).with_conversation_start_date("2025-06-28")),
        h.Message.from_role_and_content(h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(
            "Talk like a pirate.")),
        h.Message.from_role_and_content(h.Role.USER, "What is 2+2?"),
        h.Message.from_role_and_content(h.Role.ASSISTANT, "Simple sum.").with_channel("analysis"),
        h.Message.from_role_and_content(h.Role.ASSISTANT, "Arr, 4.").with_channel("final"),
        h.Message.from_role_and_content(h.Role.USER, "And 3+3? Use <|end|> if you like."),
    ]), h.Role.ASSISTANT)
    assert ours == list(theirs)


def test_render_chat_maps_the_openai_request(encoding):
    request = parse_chat_request({
        "model": "m", "reasoning_effort": "high",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "Call the tool.",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                    "parameters": {"type": "object", "properties": {
                                                        "city": {"type": "string"}}}}}],
    })
    text = get_tokenizer().decode(render_chat(request))
    assert "Reasoning: high" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\nUse metric units.\n\n# Tools\n\n" \
           "## functions\n\nnamespace functions {\n\n// Weather now\ntype get_weather = (_: {\ncity?: string,\n" \
           "}) => any;\n\n} // namespace functions<|end|>" in text
    assert text.endswith(
        "<|start|>user<|message|>Weather?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Call the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\":\"Oslo\"}<|call|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>-3<|end|>"
        "<|start|>assistant")


def test_tool_result_must_answer_a_call():
    request = parse_chat_request({"model": "m", "messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    with pytest.raises(APIError) as e:
        render_chat(request)
    assert e.value.status == 400 and e.value.param == "messages[1].tool_call_id"


def assistant_tokens(encoding, messages) -> list[int]:
    """What the model would generate after `<|start|>assistant`: the rendered messages minus that prefix."""
    out = []
    for message in messages:
        out += encoding.render(message)
    start_assistant = get_tokenizer().encode("<|start|>assistant", allow_special=True)
    assert out[:len(start_assistant)] == start_assistant
    return out[len(start_assistant):]


def openai_harmony_parse(encoding, tokens: list[int]):
    parser = h.StreamableParser(encoding, h.Role.ASSISTANT)
    for token in tokens:
        parser.process(token)
    return parser.messages


@pytest.mark.parametrize("call_header", ["recipient_first", "channel_first"])
def test_parser_reads_a_rendered_tool_call_as_openai_harmony_does(encoding, call_header):
    analysis = h.Message.from_role_and_content(h.Role.ASSISTANT, "Need Oslo's weather.").with_channel("analysis")
    call = h.Message.from_role_and_content(h.Role.ASSISTANT, '{"city": "Oslo"}').with_channel(
        "commentary").with_recipient("functions.get_weather").with_content_type("<|constrain|>json")
    tokens = assistant_tokens(encoding, [analysis, call])
    if call_header == "channel_first":  # how gpt-oss itself usually writes the header
        tok = get_tokenizer()
        text = tok.decode(tokens).replace("<|start|>assistant to=functions.get_weather<|channel|>commentary",
                                          "<|start|>assistant<|channel|>commentary to=functions.get_weather")
        tokens = tok.encode(text, allow_special=True)
    assert tokens[-1] == CALL
    reference = openai_harmony_parse(encoding, tokens)
    reply = ChatReply(get_tokenizer())
    deltas = [d for t in tokens for d in reply.feed(t)] + reply.finish()
    assert reply.reasoning == reference[0].content[0].text == "Need Oslo's weather."
    (tool_call,) = reply.tool_calls
    assert "functions." + tool_call.name == reference[1].recipient
    assert tool_call.arguments == reference[1].content[0].text
    assert reply.content == ""
    assert reply.finish_reason(CALL, hit_max_tokens=False) == "tool_calls"
    # The stream deltas add up to the message.
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reply.reasoning
    arguments = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []))
    assert arguments == tool_call.arguments
    assert reply.message()["content"] is None and reply.message()["tool_calls"][0]["id"] == tool_call.id


def test_parser_reads_a_rendered_final_answer(encoding):
    messages = [
        h.Message.from_role_and_content(h.Role.ASSISTANT, "Easy.").with_channel("analysis"),
        h.Message.from_role_and_content(h.Role.ASSISTANT, "4 — ünïcode ✓").with_channel("final"),
    ]
    tokens = assistant_tokens(encoding, messages)
    tokens[-1] = RETURN  # the model ends its reply with <|return|>, history stores <|end|>
    reference = openai_harmony_parse(encoding, tokens)
    reply = ChatReply(get_tokenizer())
    deltas = [d for t in tokens for d in reply.feed(t)] + reply.finish()
    assert (reply.reasoning, reply.content) == (reference[0].content[0].text, reference[1].content[0].text)
    assert "".join(d.get("content", "") for d in deltas) == "4 — ünïcode ✓"
    assert reply.finish_reason(RETURN, hit_max_tokens=False) == "stop"
    assert reply.finish_reason(None, hit_max_tokens=True) == "length"


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("abc E") == "abc "  # "E" may begin "END"
    assert m.feed("N") == ""
    assert m.feed("Dtail") == "" and m.hit
    assert m.flush() == ""
    m = StopMatcher(["END"])
    assert m.feed("EN") == "" and m.feed("d") == "ENd" and not m.hit
    assert m.feed("E") == "" and m.flush() == "E"


def test_text_reply_stops_at_a_sequence_and_drops_stop_tokens():
    tok = get_tokenizer()
    reply = TextReply(tok, ["\n\n"], frozenset({RETURN}))
    out = "".join(reply.feed(t) for t in tok.encode("one\ntwo\n\nthree")) + reply.finish()
    assert out == reply.text == "one\ntwo" and reply.finish_reason(hit_max_tokens=True) == "stop"
    plain = TextReply(tok, [], frozenset({RETURN}))
    out = "".join(plain.feed(t) for t in tok.encode("ab<|return|>", allow_special=True)) + plain.finish()
    assert out == "ab"
