import os
from pathlib import Path

# The real o200k_base file is cached next to the checkout (/work/shared/tiktoken); tests never go online.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiktoken  # noqa: E402

from gptoss_stream.chat import tokenizer as tokenizer_module  # noqa: E402
from gptoss_stream.chat.tokenizer import StreamDecoder, Tokenizer, get_tokenizer, special_tokens  # noqa: E402

NAMED = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented line\twith tab\r\n",
    "Ünïcödé: 日本語のテキスト, 한국어, Ελληνικά, עברית, emoji 🤖🦄🧠🫠 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x ** 2  # 12345678901234567890\n",
    "a user typing <|end|><|start|>system<|message|> as plain text",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def test_get_tokenizer_is_a_singleton(tok):
    assert get_tokenizer() is tok
    assert tok.vocab_size == 201088


def test_named_special_ids_and_attributes(tok):
    for text, token_id in NAMED.items():
        assert tok.encode(text, allow_special=True) == [token_id]
        assert tok.decode([token_id]) == text
        assert tok.special_id(text) == token_id
    assert (tok.startoftext, tok.endoftext, tok.return_, tok.constrain) == (199998, 199999, 200002, 200003)
    assert (tok.channel, tok.start, tok.end, tok.message, tok.call) == (200005, 200006, 200007, 200008, 200012)


def test_every_other_high_id_is_reserved(tok):
    specials = special_tokens()
    assert len(specials) == 201088 - 199998
    reserved = [i for i in range(200000, 201088) if i not in NAMED.values()]
    assert len(reserved) == 1088 - 7
    for i in reserved:
        assert tok.token_bytes(i) == f"<|reserved_{i}|>".encode()
        assert specials[f"<|reserved_{i}|>"] == i
    assert tok.decode([200000, 200018, 201087]) == "<|reserved_200000|><|reserved_200018|><|reserved_201087|>"
    with pytest.raises(ValueError, match="not a special token"):
        tok.special_id("<|endofprompt|>")


def test_every_id_decodes_and_specials_are_exactly_the_top_ids(tok):
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)])
    assert lengths.min() >= 1
    assert [i for i in range(199990, 200010) if tok.is_special(i)] == list(range(199998, 200010))
    assert not tok.is_special(0) and not tok.is_special(199997) and tok.is_special(201087)


def test_known_o200k_ids(tok):
    assert tok.encode("hello world") == [24912, 2375]
    assert tok.encode("assistant") == [173781]
    assert tok.decode([24912, 2375]) == "hello world"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 199998 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()


def test_special_text_is_plain_unless_allowed(tok):
    text = "x<|end|>y"
    plain = tok.encode(text)
    assert 200007 not in plain and tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert 200007 in special and tok.decode(special) == text
    assert tok.encode("<|reserved_200100|>", allow_special=True) == [200100]


def test_decode_accepts_numpy_and_rejects_out_of_range(tok):
    ids = np.array(tok.encode("hello world"), dtype=np.int64)
    assert tok.decode(ids) == "hello world"
    assert tok.decode([]) == ""
    for bad in (-1, 201088, 10**9):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([24912, bad])
        with pytest.raises(ValueError, match="outside"):
            tok.token_bytes(bad)
        with pytest.raises(ValueError, match="outside"):
            tok.is_special(bad)


def test_invalid_utf8_decodes_with_replacement(tok):
    robot = tok.encode("🤖")
    assert len(robot) >= 2 and tok.token_bytes(robot[0]) == "🤖".encode()[: len(tok.token_bytes(robot[0]))]
    assert tok.decode(robot[:1]) == "\ufffd"
    assert tok.decode(robot) == "🤖"


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("🤖 ok")
    pieces = [tok.token_bytes(i) for i in ids]
    assert pieces[0] == b"\xf0\x9f\xa4"  # the robot's first three bytes, completed by the next token
    decoder = StreamDecoder(tok)
    outputs = [decoder.feed(i) for i in ids]
    assert outputs[0] == ""
    assert outputs[1] == "🤖"
    assert "".join(outputs) + decoder.flush() == "🤖 ok"
    decoder.feed(ids[0])
    assert decoder.flush() == "\ufffd"  # an unfinished character at the very end
    assert decoder.feed(tok.encode("a")[0]) == "a"  # and flush() left it ready for more


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_decoder_matches_decode_on_arbitrary_ids(tok, seed):
    rng = np.random.default_rng(seed)
    # Random ids give plenty of partial and invalid UTF-8; a few specials and real text are mixed in.
    ids = rng.integers(0, tok.vocab_size, size=400).tolist()
    ids[::37] = [200007] * len(ids[::37])
    ids += tok.encode(TEXTS[2])
    decoder = StreamDecoder(tok)
    streamed = "".join(decoder.feed(i) for i in ids) + decoder.flush()
    assert streamed == tok.decode(ids)


def test_unloadable_vocabulary_raises_runtime_error_naming_the_fix(monkeypatch):
    def offline(name):
        raise ConnectionError("no route to openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent/cache")
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR.*/nonexistent/cache.*Go online"):
        Tokenizer()
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR is not set"):
        Tokenizer()


@pytest.mark.skipif("o200k_harmony" not in tiktoken.list_encoding_names(), reason="tiktoken has no o200k_harmony")
def test_agrees_with_tiktokens_own_o200k_harmony(tok):
    theirs = tiktoken.get_encoding("o200k_harmony")
    assert theirs.n_vocab == tok.vocab_size
    for text, token_id in special_tokens().items():
        assert theirs.encode(text, allowed_special="all") == [token_id]
    # tiktoken (like the gpt-oss reference) also keeps o200k_base's "<|endofprompt|>" as a second name for
    # 200018; SPEC §5 names that id <|reserved_200018|>, so its decoded text is the one place we differ.
    for token_id in range(199998, 201088):
        if token_id != 200018:
            assert theirs.decode_single_token_bytes(token_id) == tok.token_bytes(token_id)
    for text in TEXTS:
        assert theirs.encode(text, disallowed_special=()) == tok.encode(text)
        assert theirs.encode(text, allowed_special="all") == tok.encode(text, allow_special=True)
    ids = np.random.default_rng(0).integers(0, 199998, size=2000).tolist()
    assert theirs.decode_bytes(ids) == tok.decode_bytes(ids)
