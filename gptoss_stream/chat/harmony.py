"""The harmony chat format gpt-oss was trained on (SPEC §5): rendering conversations and parsing replies.

A message is `<|start|>{header}<|message|>{content}<|end|>`, where the header is the role, optionally
` to={recipient}`, then `<|channel|>{channel}`. The assistant thinks on the `analysis` channel and answers on
`final`; a reply ends with `<|return|>` (done) or `<|call|>` (a tool call, addressed to its recipient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gptoss_stream.chat.tokenizer import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    MESSAGE,
    RETURN,
    START,
    StreamDecoder,
    Tokenizer,
)

ROLES = ("system", "developer", "user", "assistant")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"

STOP_TOKENS_CHAT = frozenset({RETURN, CALL})
STOP_TOKENS_RAW = frozenset({ENDOFTEXT, RETURN, CALL})


@dataclass
class Message:
    role: str  # "system" | "developer" | "user" | "assistant"
    content: str
    channel: str | None = None  # assistant: "analysis" | "commentary" | "final"; None is shown as final
    recipient: str | None = None  # set on tool calls (e.g. "functions.get_weather"); they end with <|call|>


@dataclass
class Event:
    """What one generated token changed. kind:
    "channel_start": a message header was completed (channel is None if the model gave none; recipient is
        set on a tool call, e.g. "functions.get_weather");
    "text": a piece of message content, complete UTF-8;
    "message_end": the message is complete, text holds its whole content;
    "stop": a stop token ended the reply."""

    kind: str
    channel: str | None = None
    text: str = ""
    recipient: str | None = None


def system_message(
    reasoning_effort: str = "medium",
    current_date: str | None = None,
    model_identity: str = DEFAULT_MODEL_IDENTITY,
    knowledge_cutoff: str = KNOWLEDGE_CUTOFF,
) -> Message:
    """The standard harmony system message; like openai-harmony, no date line unless current_date is given."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    identity = [model_identity, f"Knowledge cutoff: {knowledge_cutoff}"]
    if current_date is not None:
        identity.append(f"Current date: {current_date}")
    sections = [
        "\n".join(identity),
        f"Reasoning: {reasoning_effort}",
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
    ]
    return Message("system", "\n\n".join(sections))


def developer_message(instructions: str) -> Message:
    """The developer message carrying what other chat formats call the system prompt."""
    return Message("developer", f"# Instructions\n\n{instructions}")


def render_message(message: Message, tokenizer: Tokenizer) -> list[int]:
    if message.role not in ROLES:
        raise ValueError(f"message role must be one of {ROLES}, got {message.role!r}")
    # Header pieces are encoded separately, as openai-harmony does, so token boundaries match its prompts.
    # Content is encoded with specials disallowed: a user typing "<|end|>" cannot end their own message.
    ids = [START, *tokenizer.encode(message.role)]
    if message.recipient is not None:
        ids += tokenizer.encode(f" to={message.recipient}")
    channel = message.channel
    if channel is None and message.role == "assistant":
        channel = "final"  # harmony requires a channel on every assistant message
    if channel is not None:
        ids += [CHANNEL, *tokenizer.encode(channel)]
    ids += [MESSAGE, *tokenizer.encode(message.content)]
    # History stores a finished reply with <|end|>, not the <|return|> the model sampled.
    ids.append(CALL if message.role == "assistant" and message.recipient is not None else END)
    return ids


def render_conversation(messages: list[Message], tokenizer: Tokenizer) -> list[int]:
    """The prompt for the assistant's next reply: every message, then `<|start|>assistant`.

    Analysis (chain of thought) from turns the assistant already finished with a final answer is dropped,
    as harmony requires; analysis after the last final answer (a turn still in progress, e.g. around a tool
    call) is kept.
    """
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and (m.channel or "final") == "final"),
        default=-1,
    )
    ids: list[int] = []
    for i, message in enumerate(messages):
        if i < last_final and message.role == "assistant" and message.channel == "analysis":
            continue
        ids += render_message(message, tokenizer)
    return ids + [START, *tokenizer.encode("assistant")]


# A real header is a handful of tokens; a longer one means the model is not speaking harmony (e.g. a random
# synthetic model), and we give its text to the user as content instead of buffering it forever.
MAX_HEADER_TOKENS = 32

_CHANNEL_TEXT = "<|channel|>"
_CONSTRAIN_TEXT = "<|constrain|>"


def parse_header(header: str, role: str | None) -> tuple[str, str | None, str | None, str]:
    """Header text (specials <|channel|>/<|constrain|> spelled out) -> (role, channel, recipient, leftover).

    `role` is given when the prompt already named it (it ended with `<|start|>assistant`); otherwise it is the
    header's first word if that is one of ROLES, else "assistant". The leftover is what is not header syntax:
    the content type of a well-formed header, or content the model wrote in the wrong place in a malformed one.
    """
    channel = None
    at = header.find(_CHANNEL_TEXT)
    if at >= 0:
        after = header[at + len(_CHANNEL_TEXT) :]
        name = re.match(r"[^\s<]*", after).group()
        channel = name or None
        header = header[:at] + " " + after[len(name) :]
    recipient = None
    to = re.search(r"(?:^|\s)to=([^\s<]+)", header)
    if to:
        recipient = to.group(1)
        header = header[: to.start()] + " " + header[to.end() :]
    header = header.replace(_CONSTRAIN_TEXT, " ")
    if role is None:
        words = header.split(maxsplit=1)
        if words and words[0] in ROLES:
            role, header = words[0], words[1] if len(words) > 1 else ""
        else:  # not a role we could render back into a prompt: the model is speaking, and this is its text
            role = "assistant"
    return role, channel, recipient, header.strip()


class HarmonyParser:
    """Streaming parser of what the model generates after the prompt.

    Real models write `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>
    ...<|return|>`. Random or broken models write anything, so feed() never raises: content with no header
    gets channel None, unknown special tokens inside content are ignored, an over-long or unterminated header
    is treated as content, and ids outside the vocabulary are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, role: str | None = "assistant", stop_tokens=STOP_TOKENS_CHAT):
        """role: the role the prompt already opened (render_conversation ends with `<|start|>assistant`);
        None if the model is expected to write `<|start|>` itself."""
        self._tokenizer = tokenizer
        self._stop_tokens = frozenset(stop_tokens)
        self._messages: list[Message] = []
        self._stopped = False
        # Exactly one of: in a header, in content, or between messages (both None).
        self._header: bytearray | None = None
        self._header_role: str | None = None
        self._header_tokens = 0
        self._current: Message | None = None
        self._decoder: StreamDecoder | None = None
        if role is not None:
            self._begin_header(role)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def messages(self) -> list[Message]:
        """Messages parsed so far, the one still being written included (with its content so far)."""
        in_progress = [self._current] if self._current is not None else []
        return [replace(m) for m in self._messages + in_progress]  # copies: ours keep growing

    def feed(self, token_id: int) -> list[Event]:
        token_id = int(token_id)
        if self._stopped or not 0 <= token_id < self._tokenizer.vocab_size:
            return []
        if self._header is not None:
            return self._feed_header(token_id)
        if self._current is not None:
            return self._feed_content(token_id)
        return self._feed_between(token_id)

    def finish(self) -> list[Event]:
        """Generation ended without a stop token reaching feed() (token limit, or a caller that does not pass
        stop tokens on): complete the message in progress, flushing any held-back partial character."""
        if self._current is not None:
            return self._end_message()
        if self._header is not None:
            return self._salvage_header()
        return []

    # --- states -------------------------------------------------------------------------------------------

    def _feed_header(self, token_id: int) -> list[Event]:
        if token_id == MESSAGE:
            role, channel, recipient, _content_type = parse_header(self._header_text(), self._header_role)
            self._header = None
            return self._begin_content(Message(role, "", channel, recipient))
        if token_id == CHANNEL or token_id == CONSTRAIN:
            return self._append_header(token_id)
        if token_id == END or token_id in self._stop_tokens or token_id == START:
            # The header never reached <|message|>: salvage what it said as a message of its own.
            events = self._salvage_header()
            if token_id in self._stop_tokens:
                return events + self._stop()
            if token_id == START:
                self._begin_header(None)
            return events
        if self._tokenizer.is_special(token_id):
            return []
        return self._append_header(token_id)

    def _feed_content(self, token_id: int) -> list[Event]:
        if token_id == END:
            return self._end_message()
        if token_id in self._stop_tokens:
            return self._end_message() + self._stop()
        if token_id == START:
            events = self._end_message()
            self._begin_header(None)
            return events
        if token_id == CHANNEL:  # a new header without <|end|><|start|>role: same speaker, new channel
            role = self._current.role
            events = self._end_message()
            self._begin_header(role)
            return events + self._append_header(CHANNEL)
        if self._tokenizer.is_special(token_id):
            return []
        return self._text(self._decoder.feed(token_id))

    def _feed_between(self, token_id: int) -> list[Event]:
        if token_id in self._stop_tokens:
            return self._stop()
        if token_id == START:
            self._begin_header(None)
            return []
        if token_id == CHANNEL:
            self._begin_header("assistant")
            return self._append_header(CHANNEL)
        if self._tokenizer.is_special(token_id):
            return []
        events = self._begin_content(Message("assistant", "", None))  # text with no header at all
        return events + self._text(self._decoder.feed(token_id))

    # --- transitions --------------------------------------------------------------------------------------

    def _begin_header(self, role: str | None) -> None:
        self._header = bytearray()
        self._header_role = role
        self._header_tokens = 0

    def _append_header(self, token_id: int) -> list[Event]:
        self._header += self._tokenizer.token_bytes(token_id)
        self._header_tokens += 1
        if self._header_tokens <= MAX_HEADER_TOKENS:
            return []
        role, channel, recipient, text = parse_header(self._header_text(), self._header_role)
        self._header = None
        return self._begin_content(Message(role, "", channel, recipient)) + self._text(text)

    def _header_text(self) -> str:
        return bytes(self._header).decode("utf-8", errors="replace")

    def _salvage_header(self) -> list[Event]:
        role, channel, recipient, text = parse_header(self._header_text(), self._header_role)
        salvageable = channel is not None or text
        self._header = None
        if not salvageable:
            return []
        events = self._begin_content(Message(role, "", channel, recipient))
        return events + self._text(text) + self._end_message()

    def _begin_content(self, message: Message) -> list[Event]:
        self._current = message
        self._decoder = StreamDecoder(self._tokenizer)
        return [Event("channel_start", message.channel, recipient=message.recipient)]

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        self._current.content += text
        return [Event("text", self._current.channel, text)]

    def _end_message(self) -> list[Event]:
        events = self._text(self._decoder.flush())
        message = self._current
        self._messages.append(message)
        self._current = None
        self._decoder = None
        return events + [Event("message_end", message.channel, message.content)]

    def _stop(self) -> list[Event]:
        self._stopped = True
        return [Event("stop")]
