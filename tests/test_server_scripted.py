"""The server on a known token stream: the official `openai` client against the real app, worker, prompt cache
and harmony code, with only the model swapped for a scripted one (server_support.ScriptedModel): reasoning
content, a tool call round trip, stop sequences, 429, a disconnect, an engine failure (FIFO order under 16
clients: test_server_api.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai_harmony")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_support import InProcessServer, ScriptedModel  # noqa: E402

from gptoss_stream.chat.tokenizer import get_tokenizer  # noqa: E402

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
THINK_THEN_ANSWER = "<|channel|>analysis<|message|>The user greets me.<|end|><|start|>assistant<|channel|>final" \
                    "<|message|>Hello there!<|return|>"
THINK_THEN_CALL = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary " \
                  "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>"
ANSWER_AFTER_TOOL = "<|channel|>final<|message|>It is 21 C in Paris.<|return|>"


def ids(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special=True)


def text(tokens: list[int]) -> str:
    return get_tokenizer().decode(tokens)


@pytest.fixture(scope="module")
def served():
    model = ScriptedModel()
    with InProcessServer(model) as server:
        server.model = model
        yield server


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)


def test_reasoning_and_content(served, client):
    served.model.script(ids(THINK_THEN_ANSWER))
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}],
                                       reasoning_effort="high")
    choice = r.choices[0]
    assert choice.message.content == "Hello there!"
    assert choice.message.reasoning_content == "The user greets me."
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens == len(ids(THINK_THEN_ANSWER))
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    prompt = text(served.model.prompts[-1])
    assert "Reasoning: high" in prompt and prompt.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_streaming_deltas(served, client):
    served.model.script(ids(THINK_THEN_ANSWER))
    stream = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}],
                                            stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    n_content_chunks = 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            if choice.delta.content:
                content += choice.delta.content
                n_content_chunks += 1
            finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("The user greets me.", "Hello there!", "stop")
    assert n_content_chunks > 1  # streamed token by token, not in one piece
    assert usage.prompt_tokens == len(served.model.prompts[-1])


def test_tool_call_round_trip(served, client):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Weather in Paris?"}]
    served.model.script(ids(THINK_THEN_CALL))
    first = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Need the weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = text(served.model.prompts[-1])
    assert "# Instructions\n\nAnswer briefly." in prompt
    assert "namespace functions {\n\n// Current weather in a city\ntype get_weather = (_: {\ncity: string,\n}) => any;" \
        in prompt
    assert "Calls to these tools must go to the commentary channel: 'functions'." in prompt

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "{\"temp_c\": 21}"}]
    served.model.script(ids(ANSWER_AFTER_TOOL))
    second = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 21 C in Paris."
    assert second.choices[0].finish_reason == "stop"
    prompt = text(served.model.prompts[-1])
    # The call and its result, the harmony way; the analysis of the unfinished turn is kept.
    assert prompt.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\": \"Paris\"}<|call|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp_c\": 21}<|end|>"
        "<|start|>assistant")
    # The prompt cache reuses the previous prompt and the generated tokens up to where the new prompt differs:
    # the call's header, which openai-harmony renders as `assistant to=... <|channel|>commentary` while the
    # model wrote `<|channel|>commentary to=...`.
    before = served.model.prompts[-2] + ids(THINK_THEN_CALL)
    common = next(i for i, (a, b) in enumerate(zip(before, served.model.prompts[-1])) if a != b)
    assert common > len(served.model.prompts[-2])
    assert second.usage.prompt_tokens_details.cached_tokens == common


def test_streamed_tool_call(served, client):
    served.model.script(ids(THINK_THEN_CALL))
    stream = client.chat.completions.create(model="scripted", tools=[WEATHER_TOOL], stream=True,
                                            messages=[{"role": "user", "content": "Weather in Paris?"}])
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = delta.id or entry["id"]
                if delta.function is not None:
                    entry["name"] = delta.function.name or entry["name"]
                    entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_renders_no_tools(served, client):
    served.model.script(ids(THINK_THEN_ANSWER))
    client.chat.completions.create(model="scripted", tools=[WEATHER_TOOL], tool_choice="none",
                                   messages=[{"role": "user", "content": "Hi"}])
    assert "get_weather" not in text(served.model.prompts[-1])


def test_stop_sequence_cuts_content_and_stops_the_engine(served, client):
    served.model.script(ids("<|channel|>final<|message|>one two three four five six<|return|>"))
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Count"}],
                                       stop=[" thr"])
    assert r.choices[0].message.content == "one two"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(ids("<|channel|>final<|message|>one two three four five six<|return|>"))


def test_max_tokens_gives_length(served, client):
    served.model.script(ids(THINK_THEN_ANSWER))
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_raw_completion(served, client):
    served.model.script(ids(" world, again.<|endoftext|>"))
    r = client.completions.create(model="scripted", prompt="Hello", max_tokens=50)
    assert r.choices[0].text == " world, again." and r.choices[0].finish_reason == "stop"
    assert text(served.model.prompts[-1]) == "Hello"
    served.model.script(ids(" world, again.<|endoftext|>"))
    chunks = [c.choices[0].text for c in client.completions.create(model="scripted", prompt="Hello",
                                                                    max_tokens=50, stream=True) if c.choices]
    assert "".join(chunks) == " world, again."


def test_engine_failure_is_a_500_and_the_server_keeps_serving(served, client):
    served.model.fail_on_call = len(served.model.calls) + 1
    served.model.script(ids(THINK_THEN_ANSWER))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["type"] == "server_error" and "scripted failure" in e.value.body["message"]
    served.model.fail_on_call = None
    served.model.script(ids(THINK_THEN_ANSWER))
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content == "Hello there!"
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the failure emptied the prompt cache


def test_full_queue_answers_429_with_retry_after():
    model = ScriptedModel(delay=0.05)
    model.script([])
    with InProcessServer(model, max_queue=1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        results = []

        def slow_request() -> None:
            r = client.chat.completions.create(model="scripted", max_tokens=20,
                                               messages=[{"role": "user", "content": "x"}])
            results.append(r.choices[0].finish_reason)

        running = threading.Thread(target=slow_request)
        running.start()
        while not server.worker.busy or server.worker.waiting:
            time.sleep(0.01)
        waiting = threading.Thread(target=slow_request)
        waiting.start()
        while server.worker.waiting < 1:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="scripted", max_tokens=1, messages=[{"role": "user", "content": "y"}])
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
        running.join()
        waiting.join()
    assert results == ["length", "length"]


def test_disconnect_mid_stream_frees_the_engine_within_one_token():
    token_seconds = 0.1
    model = ScriptedModel(delay=token_seconds)
    model.script([])
    with InProcessServer(model) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="scripted", max_tokens=500, stream=True,
                                                messages=[{"role": "user", "content": "talk forever"}])
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 3:
                    break
        stream.close()
        closed = time.perf_counter()
        while server.worker.busy:
            assert time.perf_counter() - closed < 20 * token_seconds, "the engine kept generating"
            time.sleep(0.005)
        freed = time.perf_counter() - closed
        after = [t for t, _ in model.calls if t > closed]
        # The forward pass running at the close may finish; at most one more starts after it.
        assert len(after) <= 2, f"{len(after)} forward passes after the disconnect"
        assert freed < 3 * token_seconds
        assert any("cancelled" in line for line in server.log)
        # and the next request starts at once
        model.script(ids(THINK_THEN_ANSWER))
        r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content == "Hello there!"


def test_disconnect_during_a_non_streaming_request_cancels_it():
    token_seconds = 0.05
    model = ScriptedModel(delay=token_seconds)
    model.script([])
    with InProcessServer(model) as server:
        body = {"model": "scripted", "max_tokens": 400, "messages": [{"role": "user", "content": "long"}]}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(server.base_url + "/chat/completions", json=body, timeout=0.5)
        gave_up = time.perf_counter()
        while server.worker.busy:
            assert time.perf_counter() - gave_up < 40 * token_seconds, "the engine kept generating"
            time.sleep(0.005)
        assert len(model.calls) < 100
        assert any("cancelled" in line for line in server.log)


RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                  "parameters": WEATHER_TOOL["function"]["parameters"]}


def test_responses_api_reasoning_and_text(served, client):
    served.model.script(ids(THINK_THEN_ANSWER))
    r = client.responses.create(model="scripted", input="Hi", instructions="Be kind.", reasoning={"effort": "low"})
    assert r.status == "completed" and r.output_text == "Hello there!"
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user greets me."
    assert r.usage.input_tokens == len(served.model.prompts[-1]) and r.usage.output_tokens_details.reasoning_tokens
    prompt = text(served.model.prompts[-1])
    assert "Reasoning: low" in prompt and "# Instructions\n\nBe kind." in prompt


def test_responses_api_tool_call_round_trip(served, client):
    served.model.script(ids(THINK_THEN_CALL))
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=[RESPONSES_TOOL])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    served.model.script(ids(ANSWER_AFTER_TOOL))
    history = [{"role": "user", "content": "Weather in Paris?"}] + [item.model_dump(exclude_none=True)
                                                                    for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "{\"temp_c\": 21}"})
    second = client.responses.create(model="scripted", input=history, tools=[RESPONSES_TOOL], max_output_tokens=200)
    assert second.output_text == "It is 21 C in Paris."
    assert text(served.model.prompts[-1]).endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\": \"Paris\"}<|call|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp_c\": 21}<|end|>"
        "<|start|>assistant")


def test_responses_api_errors(served, client):
    for kwargs, param in (({"input": "x", "stream": True}, "stream"), ({"input": []}, "input"),
                          ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
                          ({"input": "x", "max_output_tokens": 0}, "max_output_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="scripted", **kwargs)
        assert e.value.body["param"] == param
