"""The o200k_harmony tokenizer (SPEC §5): tiktoken's o200k_base plus the harmony special tokens.

We assemble it from `o200k_base` ourselves instead of asking tiktoken for "o200k_harmony", so any tiktoken
version that knows o200k_base works. tiktoken downloads the ranks file once and caches it; offline machines
point TIKTOKEN_CACHE_DIR at a directory that already holds it.
"""

from __future__ import annotations

import codecs
import functools
import os
from collections.abc import Iterable

import tiktoken

from gptoss_stream.errors import SetupError

VOCAB_SIZE = 201088
N_RANKS = 199998  # o200k_base's mergeable ranks are exactly 0..199997

# Special token ids, fixed by the checkpoints' embedding rows.
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

_NAMED_SPECIALS = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
}


def special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony, text -> id: the named ones and `<|reserved_N|>` for the rest."""
    specials = {text: token_id for token_id, text in _NAMED_SPECIALS.items()}
    for token_id in range(200000, VOCAB_SIZE):
        if token_id not in _NAMED_SPECIALS:
            specials[f"<|reserved_{token_id}|>"] = token_id
    return specials


def _load_o200k_base() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding("o200k_base")
    except Exception as e:  # network errors, hash mismatches of a corrupt cache, missing plugin...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache!r} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise SetupError(
            f"cannot load the o200k_base vocabulary through tiktoken ({type(e).__name__}: {e}); {where}. "
            "Go online once so tiktoken can download and cache it, or set TIKTOKEN_CACHE_DIR to a directory "
            "that holds tiktoken's cached o200k_base file."
        ) from e


class Tokenizer:
    """o200k_harmony: encode/decode text and token ids for gpt-oss."""

    vocab_size: int = VOCAB_SIZE
    startoftext = STARTOFTEXT
    endoftext = ENDOFTEXT
    return_ = RETURN
    constrain = CONSTRAIN
    channel = CHANNEL
    start = START
    end = END
    message = MESSAGE
    call = CALL

    def __init__(self) -> None:
        base = _load_o200k_base()
        ranks = base._mergeable_ranks
        if len(ranks) != N_RANKS or max(ranks.values()) != N_RANKS - 1:
            raise RuntimeError(
                f"tiktoken's o200k_base has {len(ranks)} ranks (max {max(ranks.values())}); "
                f"o200k_harmony needs exactly ranks 0..{N_RANKS - 1}"
            )
        self._special_ids = special_tokens()
        self._enc = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=base._pat_str,
            mergeable_ranks=ranks,
            special_tokens=self._special_ids,
        )
        assert self._enc.n_vocab == VOCAB_SIZE

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text (e.g. "<|end|>" typed by a user) is plain text unless allow_special."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def special_id(self, text: str) -> int:
        """Id of a special token given its text, e.g. "<|start|>" -> 200006."""
        try:
            return self._special_ids[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token of o200k_harmony") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD, special tokens appear as their text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(self._checked_one(token_id))

    def is_special(self, token_id: int) -> bool:
        return self._checked_one(token_id) >= N_RANKS

    def _checked_one(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < VOCAB_SIZE:
            raise ValueError(f"token id {token_id} is outside the o200k_harmony vocabulary [0, {VOCAB_SIZE})")
        return token_id

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]  # also accepts numpy integers, which tiktoken rejects
        if ids and not (0 <= min(ids) and max(ids) < VOCAB_SIZE):
            bad = next(i for i in ids if not 0 <= i < VOCAB_SIZE)
            raise ValueError(f"token id {bad} is outside the o200k_harmony vocabulary [0, {VOCAB_SIZE})")
        return ids


class StreamDecoder:
    """Turns generated ids into text as they arrive, holding back bytes of a UTF-8 character split across tokens.

    Concatenating every feed() and the final flush() gives exactly tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text still held back; an incomplete character at the very end becomes U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (building it reads ~200k ranks, about a second)."""
    return Tokenizer()
