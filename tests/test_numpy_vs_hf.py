"""The two references agree: numpy (SPEC §4, over the original layout) vs transformers (over the HF layout).

Both checkpoints are written from one seed, so the weights are bit-identical and any disagreement is
numerics or a mapping error. A mapping error (gate/up order, q/k/v split, RoPE pairing, GQA head order)
moves activations by O(1) of their size; bf16 rounding moves them by a few ulps. The bounds sit in between.

Why routing is replayed. Both models pick the top-4 experts of bf16 router logits that differ by a few
ulps, so wherever the 4th and 5th logits nearly tie (with 32 experts, a few tokens in a hundred) they can
legitimately pick different experts, and that token's residual then differs by a whole expert's output.
So the precise comparisons replay HF's routing in numpy (`forced=`) and separately check that every
expert HF picked is within ROUTER_TIE of numpy's own top-4 cut. The free-running comparison (numpy
routes itself) is bounded exactly only on the positions before the first routing difference; causality
keeps those untouched by it.

Bounds (relative to the spread of the reference values, since bf16 error scales with magnitude). HF
rounds to bf16 at ~10 more points per layer than SPEC §4 does (attention scores, the max-shifted scores,
probabilities, RoPE products with bf16 cos/sin, mlp1 before the bias add, each SwiGLU step, each
expert's weighted output and each index_add_ accumulation; docs/reference-notes.md). Each is <= 2^-9
of the value rounded, but softmax turns an absolute error in a shifted score (values down to ~-10) into
a relative error of the probability, so HF's attention output alone is ~1% off SPEC's fp32 attention.
Measured on tiny and on the full-width 2-layer model (T = 300), with the bound used:
- per layer, same input: relative Frobenius error ||Δ|| / ||ref||: 0.003-0.013; LAYER_FRO = 2^-5.
  max |Δ| / rms(row) over every token and channel: 0.03-0.096; LAYER_MAX = 2^-2.
- router logits on the same input, max |Δ| / rms(logits): <= 0.021; ROUTER_BOUND = 2^-4. An expert
  HF picked and numpy did not must be within ROUTER_TIE = 2 x ROUTER_BOUND x rms of numpy's 4th logit.
- logits end to end with HF's routing replayed, max |Δlogit| / std(logits): 0.05-0.23; LOGIT_BOUND = 0.5
  (HF's logits are themselves bf16: ulp 2^-5 near 8 = 4 std).
- final norm + unembedding alone on HF's last residual: ~0.0156 (HF's bf16 logits); UNEMBED_BOUND = 0.05.
A plausible mapping mistake (gate/up halves instead of interleaved, RoPE on adjacent pairs, the wrong
GQA head order) gives a per-layer max |Δ| / rms of 1.6-3 (test_a_mapping_mistake_is_detected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is needed for the Hugging Face reference (pip install torch)")
pytest.importorskip("transformers", reason="transformers is needed for the Hugging Face reference")

import hf_reference as hr  # noqa: E402
import numpy_reference as nr  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402

LAYER_FRO = 2.0**-5
LAYER_MAX = 2.0**-2
ROUTER_BOUND = 2.0**-4
ROUTER_TIE = 2 * ROUTER_BOUND
LOGIT_BOUND = 0.5
UNEMBED_BOUND = 0.05
FREE_WITHIN_BOUND = 0.9  # free-running: share of positions still within LOGIT_BOUND (routing differences aside)

LENGTHS = [1, 17, 300]  # 300 crosses the 128-token sliding window
WIDE = pytest.param("wide", marks=pytest.mark.slow)  # full width (H = 2880, 32 experts, full vocab), 2 layers


def prompt(n: int, seed: int = 7) -> list[int]:
    # Ordinary (non-special) token ids; each shorter prompt is a prefix of the longer ones.
    return np.random.default_rng(seed).integers(0, 199_998, size=300)[:n].tolist()


def rel_rows(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max over rows of max|Δ| / rms(reference row)."""
    rms = np.sqrt(np.mean(theirs.astype(np.float64) ** 2, axis=-1))
    return float(np.max(np.max(np.abs(ours - theirs), axis=-1) / rms))


def rel_fro(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def rel_std(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs)) / np.std(theirs))


def kth_cut_violations(np_logits: np.ndarray, hf_indices: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Tokens where HF picked an expert more than tol[t] below numpy's k-th largest logit."""
    k = hf_indices.shape[1]
    kth = -np.sort(-np_logits, axis=-1)[:, k - 1]
    picked = np.take_along_axis(np_logits, hf_indices, axis=-1).min(axis=-1)
    return np.flatnonzero(picked < kth - tol)


def route_differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.sort(a, axis=-1) != np.sort(b, axis=-1)).any(axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The two models and, per prompt, one HF run shared by the tests
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    ckpt: Checkpoint  # read by the numpy reference
    model: object  # transformers GptOssForCausalLM over the HF layout
    runs: dict = field(default_factory=dict)

    def hf_run(self, n: int) -> tuple[list[np.ndarray], list[tuple], np.ndarray]:
        """(residual streams, routes per layer, logits) of transformers on prompt(n), computed once."""
        if n not in self.runs:
            routes: list[tuple] = []
            streams, logits = hr.hf_hidden_states(self.model, prompt(n), routes)
            self.runs[n] = (streams, routes, logits)
        return self.runs[n]


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint: Path) -> Pair:
    return Pair("tiny", Checkpoint.open(tiny_checkpoint / "original"), hr.load_hf_model(tiny_checkpoint / "hf"))


@pytest.fixture(scope="module")
def wide_pair(full_width_checkpoint: Path) -> Pair:
    # gpt-oss-20b's width with 2 layers (conftest); transformers spends ~70 s dequantizing its 64 experts.
    return Pair("wide", Checkpoint.open(full_width_checkpoint), hr.load_hf_model(full_width_checkpoint))


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Pair:
    return request.getfixturevalue(f"{request.param}_pair")


# ---------------------------------------------------------------------------------------------------------
# Layer by layer, same input, HF's routing replayed
# ---------------------------------------------------------------------------------------------------------


def compare_layers(pair: Pair, n: int) -> list[dict]:
    """Per layer, numpy on HF's input stream with HF's routing vs HF's output stream."""
    streams, routes, _ = pair.hf_run(n)
    positions = np.arange(n)
    rows = []
    for layer, (hf_idx, _, hf_logits) in enumerate(routes):
        np_routes: list[tuple] = []
        out = nr.layer_forward(pair.ckpt, layer, streams[layer], positions, np_routes, forced=hf_idx)
        np_logits = np_routes[0][2]
        g_rms = float(np.sqrt(np.mean(hf_logits.astype(np.float64) ** 2)))
        own = np.argsort(-np_logits, axis=-1, kind="stable")[:, : hf_idx.shape[1]]
        rows.append(
            dict(
                layer=layer,
                fro=rel_fro(out, streams[layer + 1]),
                max=rel_rows(out, streams[layer + 1]),
                router=float(np.max(np.abs(np_logits - hf_logits)) / g_rms),
                flips=np.flatnonzero(route_differs(own, hf_idx)),
                unexplained=kth_cut_violations(np_logits, hf_idx, np.full(n, ROUTER_TIE * g_rms)),
            )
        )
    return rows


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("pair", ["tiny", WIDE], indirect=True)
def test_layer_by_layer(pair: Pair, n: int):
    rows = compare_layers(pair, n)
    for r in rows:
        print(
            f"{pair.name} T={n} layer {r['layer']}: ||Δ||/||x|| {r['fro']:.4f}, max|Δ|/rms {r['max']:.4f}, "
            f"router max|Δ|/rms {r['router']:.4f}, numpy's own routing differs at {len(r['flips'])}/{n} tokens"
        )
    for r in rows:  # in layer order, so a failure names the first layer that diverges
        layer = r["layer"]
        assert r["router"] <= ROUTER_BOUND, f"layer {layer}: router logits differ by {r['router']:.4f} x rms"
        assert not len(r["unexplained"]), (
            f"layer {layer}: HF routes tokens {r['unexplained'][:10]} to experts numpy ranks far below its top-k"
        )
        assert r["fro"] <= LAYER_FRO, f"layer {layer}: output differs by {r['fro']:.4f} (relative Frobenius)"
        assert r["max"] <= LAYER_MAX, f"layer {layer}: output differs by up to {r['max']:.4f} x rms"


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("pair", ["tiny", WIDE], indirect=True)
def test_final_norm_and_unembedding(pair: Pair, n: int):
    streams, _, hf_logits = pair.hf_run(n)
    err = rel_std(nr.unembed(pair.ckpt, streams[-1]), hf_logits)
    print(f"{pair.name} T={n}: unembedding max|Δlogit|/std {err:.4f}")
    assert err <= UNEMBED_BOUND


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("pair", ["tiny", WIDE], indirect=True)
def test_logits_with_replayed_routing(pair: Pair, n: int):
    _, routes, hf_logits = pair.hf_run(n)
    ours = nr.forward(pair.ckpt, prompt(n), forced=[r[0] for r in routes])
    d = np.abs(ours - hf_logits)
    err = float(d.max() / hf_logits.std())
    agree = float(np.mean(ours.argmax(-1) == hf_logits.argmax(-1)))
    print(f"{pair.name} T={n} replayed routing: max|Δlogit| {d.max():.4f} = {err:.4f} std, argmax agree {agree:.3f}")
    # Within this bound the greedy token can only differ where HF's top two logits are within
    # 2 x LOGIT_BOUND std of each other (on a random synthetic model, a good share of positions).
    assert err <= LOGIT_BOUND


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("pair", ["tiny", WIDE], indirect=True)
def test_logits_free_running(pair: Pair, n: int):
    """Each model routes itself. Positions before the first routing difference (in any layer) are held
    to LOGIT_BOUND; after it, most positions must still be. Prints where the streams part."""
    streams, hf_routes, hf_logits = pair.hf_run(n)
    np_routes: list[tuple] = []
    np_streams = nr.forward_layers(pair.ckpt, prompt(n), np_routes)
    ours = nr.unembed(pair.ckpt, np_streams[-1])
    flipped = np.zeros(n, bool)
    for (np_idx, _, _), (hf_idx, _, _) in zip(np_routes, hf_routes):
        flipped |= route_differs(np_idx, hf_idx)
    clean = n if not flipped.any() else int(np.argmax(flipped))
    std = hf_logits.std()
    row = np.abs(ours - hf_logits).max(axis=-1) / std
    drift = [rel_fro(a, b) for a, b in zip(np_streams, streams)]
    first = next((i for i, e in enumerate(drift) if e > LAYER_FRO), None)
    print(
        f"{pair.name} T={n} free-running: max|Δlogit| {row.max() * std:.4f} = {row.max():.4f} std, "
        f"argmax agree {np.mean(ours.argmax(-1) == hf_logits.argmax(-1)):.3f}, "
        f"tokens routed differently in some layer {int(flipped.sum())}, clean prefix {clean}, "
        f"within bound {np.mean(row <= LOGIT_BOUND):.3f}; stream ||Δ||/||x|| per layer "
        + " ".join(f"{e:.4f}" for e in drift)
        + ("" if first is None else f" (first beyond {LAYER_FRO}: stream {first})")
    )
    if clean:
        assert row[:clean].max() <= LOGIT_BOUND
    assert np.mean(row <= LOGIT_BOUND) >= FREE_WITHIN_BOUND


# ---------------------------------------------------------------------------------------------------------
# Decoding and the helpers themselves (tiny only)
# ---------------------------------------------------------------------------------------------------------


def test_greedy_decode_with_hf_cache_matches_numpy(tiny_pair: Pair):
    """HF's cached greedy decode (hf_generate_greedy) against numpy's full forward over the same tokens
    with HF's routing replayed: every step's logits within LOGIT_BOUND, so the same greedy token
    wherever the choice is not a near-tie."""
    steps = 8
    start = prompt(17)
    hf_tokens, hf_steps = hr.hf_generate_greedy(tiny_pair.model, start, steps)
    assert len(hf_tokens) == steps and hf_steps.shape == (steps, tiny_pair.ckpt.config.vocab_size)
    seq = start + hf_tokens[:-1]
    routes: list[tuple] = []
    hr.hf_hidden_states(tiny_pair.model, seq, routes)
    ours = nr.forward(tiny_pair.ckpt, seq, forced=[r[0] for r in routes])[len(start) - 1 :]
    for i in range(steps):
        std = hf_steps[i].std()
        err = np.abs(ours[i] - hf_steps[i]).max() / std
        top2 = np.sort(hf_steps[i])[-2:]
        print(f"step {i}: hf {hf_tokens[i]} numpy {int(ours[i].argmax())} max|Δ|/std {err:.4f}")
        assert err <= LOGIT_BOUND, f"decode step {i}"
        if top2[1] - top2[0] > 2 * LOGIT_BOUND * std:
            assert int(ours[i].argmax()) == hf_tokens[i], f"decode step {i}: decisive greedy token differs"


def test_hf_cached_decode_equals_hf_full_forward(tiny_pair: Pair):
    start = prompt(130)  # the decode steps cross the 128-token window of the sliding layers
    tokens, steps = hr.hf_generate_greedy(tiny_pair.model, start, 4)
    full = hr.hf_logits(tiny_pair.model, start + tokens[:-1])[len(start) - 1 :]
    assert rel_std(steps, full) <= UNEMBED_BOUND
    assert tokens == [int(t) for t in full.argmax(-1)]


def test_hf_layer_forward_reproduces_the_hf_model(tiny_pair: Pair):
    streams, _, _ = tiny_pair.hf_run(17)
    for layer in range(len(streams) - 1):
        out = hr.hf_layer_forward(tiny_pair.model, layer, streams[layer], range(17))
        assert np.array_equal(out, streams[layer + 1]), f"layer {layer}"


def test_hf_hidden_states_are_the_residual_stream(tiny_pair: Pair):
    streams, routes, logits = tiny_pair.hf_run(17)
    cfg = tiny_pair.ckpt.config
    assert len(streams) == cfg.num_hidden_layers + 1 and len(routes) == cfg.num_hidden_layers
    embedding = nr.bf16_to_f32(np.asarray(tiny_pair.ckpt.embedding()[prompt(17)]))
    assert np.array_equal(streams[0], embedding)  # the input of layer 0 is the raw embedding
    assert np.array_equal(logits, hr.hf_logits(tiny_pair.model, prompt(17)))


# ---------------------------------------------------------------------------------------------------------
# The comparison can fail: plausible mapping mistakes in the numpy side are caught by the bounds
# ---------------------------------------------------------------------------------------------------------


_swiglu, _rope, _attention = nr.swiglu, nr.rope, nr.attention  # the originals, before monkeypatching


def swiglu_concatenated(h: np.ndarray, limit: float = 7.0, alpha: float = 1.702) -> np.ndarray:
    half = h.shape[-1] // 2  # gate = first half, up = second half (the layout gpt-oss does NOT use)
    return _swiglu(np.stack([h[..., :half], h[..., half:]], axis=-1).reshape(h.shape), limit, alpha)


def rope_adjacent_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # Rotate (2i, 2i+1) pairs (GPT-J style) instead of (i, i + D/2).
    half = x.shape[-1] // 2
    y = x.reshape(*x.shape[:-1], half, 2).swapaxes(-1, -2).reshape(x.shape)
    return _rope(y, cos, sin).reshape(*x.shape[:-1], 2, half).swapaxes(-1, -2).reshape(x.shape)


def attention_kv_heads_strided(q, k, v, sinks, q_positions, k_positions, sliding_window=0):
    # q head j served by kv head j % Hkv instead of j // G.
    n_q, n_kv = q.shape[1], k.shape[1]
    order = np.argsort(np.arange(n_q) % n_kv, kind="stable")  # q heads grouped by their (wrong) kv head
    s = nr.bf16_to_f32(sinks) if sinks.dtype == np.uint16 else sinks
    out = _attention(q[:, order], k, v, s[order], q_positions, k_positions, sliding_window)
    T, D = q.shape[0], q.shape[2]
    back = np.empty_like(out.reshape(T, n_q, D))
    back[:, order] = out.reshape(T, n_q, D)
    return back.reshape(T, n_q * D)


@pytest.mark.parametrize(
    "name, replacement",
    [("swiglu", swiglu_concatenated), ("rope", rope_adjacent_pairs), ("attention", attention_kv_heads_strided)],
)
def test_a_mapping_mistake_is_detected(tiny_pair: Pair, monkeypatch: pytest.MonkeyPatch, name, replacement):
    monkeypatch.setattr(nr, name, replacement)
    worst = max(r["max"] for r in compare_layers(tiny_pair, 17))
    print(f"{name} mistake: worst layer max|Δ|/rms {worst:.3f} (bound {LAYER_MAX})")
    assert worst > 4 * LAYER_MAX
