"""`gptoss serve` as users run it: a subprocess on the tiny synthetic checkpoint, driven by the official `openai`
client. The tiny model writes random tokens, so these tests check the protocol, the prompt cache, errors,
load and memory; what the model says is tested on a scripted model (test_server_scripted.py)."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai_harmony")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_support import ServeProcess  # noqa: E402

MODEL = "gpt-oss-tiny"
KEY = "test-key"
CONTEXT = 1024


@pytest.fixture(scope="module")
def server(tiny_original):
    proc = ServeProcess("-m", str(tiny_original), "--context", str(CONTEXT), "--model-name", MODEL,
                        "--api-key", KEY, "--max-queue", "16")
    yield proc
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status tells it
    assert proc.stop() == -signal.SIGTERM, "".join(proc.log)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 4, **kwargs})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_completion(client):
    r = chat(client, "Hello!", temperature=0.7, top_p=0.9, seed=1)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop", "tool_calls")
    assert r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seed_makes_sampling_reproducible(client):
    a = chat(client, "Same seed", seed=42, max_tokens=6)
    b = chat(client, "Same seed", seed=42, max_tokens=6)
    assert a.choices[0].message == b.choices[0].message


def test_streaming_chat_with_usage(client):
    chunks = list(chat(client, "Stream this", stream=True, stream_options={"include_usage": True}, max_tokens=6))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert len({c.id for c in chunks}) == 1


def test_raw_completion(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens <= 5


def test_responses_endpoint(client):
    r = client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=4)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.usage.output_tokens <= 4 and r.usage.input_tokens > 20


def test_second_turn_hits_the_prompt_cache(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "First question?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    messages += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "Second question?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    # The second prompt starts with the whole first prompt (which ends in <|start|>assistant).
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > second.usage.prompt_tokens_details.cached_tokens


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the SDK unwraps {"error": {...}}
    return e.value


@pytest.mark.parametrize("kwargs, status, param", [
    ({"model": "gpt-5"}, 404, "model"),
    ({"n": 2}, 400, "n"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10 ** 12}, 400, "max_tokens"),
    ({"temperature": 5}, 400, "temperature"),
    ({"reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400,
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": "string"}}}}]}, 400, "tools[0].function.parameters.properties"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests(client, kwargs, status, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    e = error_of(lambda: client.chat.completions.create(**request))
    assert e.status_code == status and e.body["param"] == param
    assert e.body["type"] == "invalid_request_error" and e.body["message"]


def test_prompt_longer_than_the_context(client):
    e = error_of(lambda: chat(client, "word " * (CONTEXT + 10)))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages"
    assert str(CONTEXT) in e.body["message"]


def test_malformed_json_and_missing_messages(server):
    url = server.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url, content=b'{"model": "x", "messages": [', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json=[1, 2], headers=headers)
    assert r.status_code == 400
    r = httpx.get(server.base_url + "/nowhere", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.get(server.base_url + "/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url.removesuffix("/v1") + "/health").status_code == 200  # no key needed


def test_still_serving_after_the_errors(client):
    assert chat(client, "Still there?").choices[0].message is not None


def test_disconnect_mid_stream_frees_the_engine(server, client):
    stream = chat(client, "Go on and on", stream=True, max_tokens=600)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    closed = time.monotonic()
    health = server.base_url.removesuffix("/v1") + "/health"
    while httpx.get(health).json()["busy"]:
        assert time.monotonic() - closed < 10, "the engine kept generating after the client left"
        time.sleep(0.02)
    cancelled = [line for line in server.log if " cancelled after" in line]
    generated = int(re.search(r"(\d+) generated", cancelled[-1]).group(1))
    assert generated < 100
    assert chat(client, "Next!").choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_16_clients_4_requests_each_in_arrival_order(server, client):
    errors, done = [], []
    first = len(server.log)

    def user(k: int) -> None:
        try:
            for i in range(4):
                r = chat(client, f"client {k} request {i}", max_tokens=3, stream=i % 2 == 1)
                done.append(list(r) if i % 2 else r)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(done) == 64
    started = [int(m.group(1)) for m in map(re.compile(r"#(\d+) start:").search, server.log[first:]) if m]
    assert len(started) == 64 and started == list(range(started[0], started[0] + 64))


def test_no_memory_growth_over_200_requests(server, client):
    """RssAnon after 200 requests within 5% of after 10 (the KV cache and buffers are reused, nothing piles up);
    open file descriptors and threads no more (connections closed, no thread per request left behind)."""
    def requests(n: int, offset: int) -> None:
        for i in range(offset, offset + n):  # mostly chat turns that hit the prompt cache, to keep it quick
            if i % 10 == 9:
                client.completions.create(model=MODEL, prompt=f"raw request {i}", max_tokens=2)
            else:
                response = chat(client, f"request {i}", stream=i % 2 == 1, max_tokens=2)
                if i % 2:
                    list(response)

    requests(10, 0)
    after_10, counts_10 = server.rss_anon_kib(), server.open_fds_and_threads()
    requests(190, 10)
    after_200, counts_200 = server.rss_anon_kib(), server.open_fds_and_threads()
    print(f"RssAnon after 10 requests: {after_10} KiB, after 200: {after_200} KiB; (fds, threads) {counts_10} -> "
          f"{counts_200}")
    assert after_200 <= after_10 * 1.05, f"RssAnon grew from {after_10} KiB to {after_200} KiB"
    # Not equal: connections of earlier tests that are still open when the first sample is taken may close
    # in between. A descriptor or thread per request left behind would add ~190.
    assert counts_200[0] <= counts_10[0] and counts_200[1] <= counts_10[1], \
        f"(open fds, threads) went from {counts_10} to {counts_200}"


def test_serve_refuses_a_taken_port_and_a_bad_queue_limit(tiny_original):
    import socket
    import subprocess
    import sys

    from server_support import ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                              (["--max-queue", "0"], "--max-queue must be >= 1")):
            r = subprocess.run([sys.executable, "-m", "gptoss_stream.commands.cli", "serve", "-m", str(tiny_original),
                                *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert r.returncode == 1 and r.stderr.startswith("gptoss: error: ") and message in r.stderr, r.stderr
