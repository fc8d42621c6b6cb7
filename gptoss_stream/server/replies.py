"""Generated tokens -> what the API returns: stream deltas, the final message, finish_reason, usage.

Chat (harmony, parsed by chat.harmony.HarmonyParser): `analysis` -> reasoning_content; `final`, a channel-less
message or a `commentary` preamble -> content; a message to a recipient (`to=functions.NAME`) -> a tool call
whose arguments are its content; `<|call|>` ends the reply with finish_reason "tool_calls". Raw completions:
the decoded text. Stop sequences cut content (never reasoning or tool arguments) at their first match.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from gptoss_stream.chat.harmony import STOP_TOKENS_CHAT, HarmonyParser
from gptoss_stream.chat.tokenizer import CALL, StreamDecoder, Tokenizer
from gptoss_stream.server.harmony_bridge import FUNCTIONS


class StopMatcher:
    """Cuts text at the first of the request's stop strings; holds back a tail that may be the start of one."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stop:
            return text
        self.pending += text
        at = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if at >= 0:
            self.hit = True
            out, self.pending = self.pending[:at], ""
            return out
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


# ---------------------------------------------------------------------------- replies


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChatReply:
    """A reply assembled token by token; feed() returns the stream deltas each token produced."""

    tokenizer: Tokenizer
    stop: list[str] = field(default_factory=list)
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        self._parser = HarmonyParser(self.tokenizer, stop_tokens=STOP_TOKENS_CHAT)
        self._matcher = StopMatcher(self.stop)
        self._kind: str | None = None  # what the message being written is: "reasoning", "content" or "tool"

    @property
    def stopped_by_sequence(self) -> bool:
        return self._matcher.hit

    def feed(self, token: int) -> list[dict]:
        if self._kind == "reasoning":
            self.reasoning_tokens += 1
        return self._deltas(self._parser.feed(token))

    def finish(self) -> list[dict]:
        """Generation ended: whatever the parser and the stop matcher still hold."""
        deltas = self._deltas(self._parser.finish())
        tail = self._matcher.flush()
        if tail:
            self.content += tail
            deltas.append({"content": tail})
        return deltas

    def finish_reason(self, stop_token: int | None, hit_max_tokens: bool) -> str:
        if self.stopped_by_sequence:
            return "stop"
        if hit_max_tokens:
            return "length"
        return "tool_calls" if self.tool_calls and stop_token == CALL else "stop"

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.content if self.content or not self.tool_calls else None,
                   "reasoning_content": self.reasoning or None}
        if self.tool_calls:
            message["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        return message

    def _deltas(self, events) -> list[dict]:
        deltas = []
        for event in events:
            if event.kind == "channel_start":
                if event.recipient is not None:
                    name = event.recipient.removeprefix(FUNCTIONS)
                    call = ToolCall(f"call_{secrets.token_hex(12)}", name)
                    self.tool_calls.append(call)
                    self._kind = "tool"
                    deltas.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "id": call.id,
                                                   "type": "function",
                                                   "function": {"name": name, "arguments": ""}}]})
                else:
                    self._kind = "reasoning" if event.channel == "analysis" else "content"
            elif event.kind == "text" and not self._matcher.hit:
                if self._kind == "tool":
                    self.tool_calls[-1].arguments += event.text
                    deltas.append({"tool_calls": [{"index": len(self.tool_calls) - 1,
                                                   "function": {"arguments": event.text}}]})
                elif self._kind == "reasoning":
                    self.reasoning += event.text
                    deltas.append({"reasoning_content": event.text})
                else:
                    text = self._matcher.feed(event.text)
                    if text:
                        self.content += text
                        deltas.append({"content": text})
            elif event.kind == "message_end":
                self._kind = None
        return deltas


@dataclass
class TextReply:
    """A raw completion: the generated text (stop tokens excluded), cut at the first stop sequence."""

    tokenizer: Tokenizer
    stop: list[str] = field(default_factory=list)
    stop_tokens: frozenset[int] = frozenset()
    text: str = ""

    def __post_init__(self) -> None:
        self._decoder = StreamDecoder(self.tokenizer)
        self._matcher = StopMatcher(self.stop)

    @property
    def stopped_by_sequence(self) -> bool:
        return self._matcher.hit

    def feed(self, token: int) -> str:
        if token in self.stop_tokens:
            return ""
        return self._add(self._matcher.feed(self._decoder.feed(token)))

    def finish(self) -> str:
        return self._add(self._matcher.feed(self._decoder.flush()) + self._matcher.flush())

    def finish_reason(self, hit_max_tokens: bool) -> str:
        return "length" if hit_max_tokens and not self.stopped_by_sequence else "stop"

    def _add(self, text: str) -> str:
        self.text += text
        return text


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }

