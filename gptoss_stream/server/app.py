"""The HTTP routes (FastAPI): /v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /health.

A handler checks and renders its request on the event loop, queues a Job on the Worker and turns the tokens
the engine thread sends back into a JSON answer or server-sent events. Every error is an OpenAI error object
(protocol.APIError); the client going away cancels its job (see _cancel_on_disconnect).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptoss_stream.chat.harmony import STOP_TOKENS_CHAT, STOP_TOKENS_RAW
from gptoss_stream.chat.tokenizer import Tokenizer
from gptoss_stream.engine.sampling import SamplingParams
from gptoss_stream.server import harmony_bridge, responses
from gptoss_stream.server.protocol import APIError, Sampling, parse_chat_request, parse_completion_request, \
    parse_json
from gptoss_stream.server.replies import ChatReply, TextReply, usage
from gptoss_stream.server.worker import Failed, Finished, Job, QueueFullError, Token, Worker


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None


def create_app(worker: Worker, tokenizer: Tokenizer, settings: Settings) -> FastAPI:
    """The app over a started Worker; `tokenizer` decodes what the engine generates."""
    app = FastAPI(title="gptoss serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        what = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, code=what).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        traceback.print_exc()
        error = APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           param=None, code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist: this server serves "
                                f"'{settings.model_name}'", param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "gptoss-stream"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "waiting": worker.waiting, "busy": worker.busy}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict:
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse_chat_request(parse_json(await request.body()))
        check_model(req.model)
        prompt = harmony_bridge.render_chat(req, harmony_bridge.today())
        run = Run.submit(worker, prompt, req.sampling, STOP_TOKENS_CHAT, "messages")
        reply = ChatReply(tokenizer, req.sampling.stop)
        stream = Stream(f"chatcmpl-{run.job.seq}-{secrets.token_hex(6)}", "chat.completion.chunk",
                        settings.model_name, req.include_usage)
        if req.stream:
            return sse_response(run, request, stream_chat(run, reply, stream))
        finished = await run.collect(request, reply.feed, reply)
        reply.finish()
        return {
            "id": stream.id, "object": "chat.completion", "created": stream.created, "model": settings.model_name,
            "choices": [{"index": 0, "message": reply.message(), "logprobs": None,
                         "finish_reason": reply.finish_reason(finished.stop_token, finished.reason == "length")}],
            "usage": usage_of(finished, reply.reasoning_tokens),
        }

    @app.post("/v1/responses")
    async def create_response(request: Request):
        authorize(request)
        body = parse_json(await request.body())
        req = parse_chat_request(responses.chat_body(body))
        check_model(req.model)
        prompt = harmony_bridge.render_chat(req, harmony_bridge.today())
        run = Run.submit(worker, prompt, req.sampling, STOP_TOKENS_CHAT, "input")
        reply = ChatReply(tokenizer, req.sampling.stop)
        finished = await run.collect(request, reply.feed, reply)
        reply.finish()
        reason = reply.finish_reason(finished.stop_token, finished.reason == "length")
        return responses.response_object(settings.model_name, reply, reason,
                                         usage_of(finished, reply.reasoning_tokens), body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse_completion_request(parse_json(await request.body()))
        check_model(req.model)
        prompt = tokenizer.encode(req.prompt, allow_special=True)
        run = Run.submit(worker, prompt, req.sampling, STOP_TOKENS_RAW, "prompt")
        reply = TextReply(tokenizer, req.sampling.stop, STOP_TOKENS_RAW)
        stream = Stream(f"cmpl-{run.job.seq}-{secrets.token_hex(6)}", "text_completion", settings.model_name,
                        req.include_usage)
        if req.stream:
            return sse_response(run, request, stream_text(run, reply, stream))
        finished = await run.collect(request, reply.feed, reply)
        reply.finish()
        return {
            "id": stream.id, "object": "text_completion", "created": stream.created, "model": settings.model_name,
            "choices": [{"index": 0, "text": reply.text, "logprobs": None,
                         "finish_reason": reply.finish_reason(finished.reason == "length")}],
            "usage": usage_of(finished),
        }

    return app


# ---------------------------------------------------------------------------- one request on the engine


def sampling_params(sampling: Sampling) -> SamplingParams:
    if sampling.top_p == 0:  # OpenAI accepts top_p 0: only the most likely token
        return SamplingParams(temperature=0.0, seed=sampling.seed)
    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)


def completion_budget(prompt_tokens: int, requested: int | None, context_length: int, prompt_param: str) -> int:
    """max_tokens for the job: what was asked, or the rest of the context; 400 if the context cannot hold it.
    The last generated token is never fed back, so prompt + max_tokens - 1 positions must fit."""
    room = context_length - prompt_tokens + 1
    if room < 1 or (requested is not None and requested > room):
        asked = f"{prompt_tokens} in the prompt" + (f" and {requested} to generate" if requested else "")
        raise APIError(400, f"This model's context is {context_length} tokens, but the request needs more "
                            f"({asked}); shorten the prompt or lower max_tokens (the server's --context sets "
                            "the context)", param=prompt_param if room < 1 else "max_tokens",
                       code="context_length_exceeded")
    return requested if requested is not None else room


class Run:
    """A Job on the engine and the asyncio queue its tokens arrive on."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    @classmethod
    def submit(cls, worker: Worker, prompt: list[int], sampling: Sampling, stop_tokens: frozenset[int],
               prompt_param: str) -> Run:
        max_tokens = completion_budget(len(prompt), sampling.max_tokens, worker.context_length, prompt_param)
        run = cls(Job(prompt, max_tokens, sampling_params(sampling), stop_tokens, emit=None),
                  asyncio.get_running_loop())
        run.job.emit = run._emit
        try:
            worker.submit(run.job)
        except QueueFullError as e:
            raise APIError(429, f"The server is busy: {e}; retry in {e.retry_after} s", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from None
        return run

    def _emit(self, event: object) -> None:  # on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.job.cancel()

    async def tokens(self) -> AsyncIterator[int | Finished]:
        """Each generated token id, then the Finished record; Failed becomes an APIError."""
        while True:
            event = await self.events.get()
            if isinstance(event, Token):
                yield event.id
            elif isinstance(event, Finished):
                yield event
                return
            elif isinstance(event, Failed):
                raise APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}",
                               type="server_error")

    async def collect(self, request: Request, feed, reply) -> Finished:
        """Run to the end for a non-streaming answer, cancelling if the client leaves."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.job))
        try:
            async for item in self.tokens():
                if isinstance(item, Finished):
                    return item
                feed(item)
                if reply.stopped_by_sequence:
                    self.job.cancel()
        finally:
            self.job.cancel()  # a no-op once finished; stops the engine if this handler was cancelled
            watcher.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client closes its connection (the engine stops before its next token)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def usage_of(finished: Finished, reasoning_tokens: int = 0) -> dict:
    return usage(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens, reasoning_tokens)


# ---------------------------------------------------------------------------- server-sent events


@dataclass
class Stream:
    id: str
    object: str
    model: str
    include_usage: bool

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def chunk(self, choice: dict | None, usage: dict | None = None) -> str:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [] if choice is None else [{"index": 0, **choice}]}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


def sse_response(run: Run, request: Request, events: AsyncIterator[str]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, run.job))
        try:
            async for event in events:
                yield event
        except APIError as e:  # the engine failed mid-stream: the client's SDK raises on an error event
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            run.job.cancel()
            watcher.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream_chat(run: Run, reply: ChatReply, stream: Stream) -> AsyncIterator[str]:
    yield stream.chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
    async for item in run.tokens():
        if isinstance(item, Finished):
            for delta in reply.finish():
                yield stream.chunk({"delta": delta, "logprobs": None, "finish_reason": None})
            reason = reply.finish_reason(item.stop_token, item.reason == "length")
            yield stream.chunk({"delta": {}, "logprobs": None, "finish_reason": reason})
            if stream.include_usage:
                yield stream.chunk(None, usage_of(item, reply.reasoning_tokens))
            return
        for delta in reply.feed(item):
            yield stream.chunk({"delta": delta, "logprobs": None, "finish_reason": None})
        if reply.stopped_by_sequence:
            run.job.cancel()


async def stream_text(run: Run, reply: TextReply, stream: Stream) -> AsyncIterator[str]:
    async for item in run.tokens():
        if isinstance(item, Finished):
            tail = reply.finish()
            if tail:
                yield stream.chunk({"text": tail, "logprobs": None, "finish_reason": None})
            yield stream.chunk({"text": "", "logprobs": None,
                                "finish_reason": reply.finish_reason(item.reason == "length")})
            if stream.include_usage:
                yield stream.chunk(None, usage_of(item))
            return
        text = reply.feed(item)
        if text:
            yield stream.chunk({"text": text, "logprobs": None, "finish_reason": None})
        if reply.stopped_by_sequence:
            run.job.cancel()
