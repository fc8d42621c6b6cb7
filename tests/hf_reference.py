"""Hugging Face transformers' GptOssForCausalLM as an independent reference (CPU, bf16, offline).

The model is loaded from a Hugging Face format directory with the MXFP4 experts dequantized to bf16
(there are no triton kernels on a CPU box), eager attention and the eager (per-expert loop) MoE, so
the code that runs is exactly transformers' modeling_gpt_oss.py. Nothing is fetched from a hub.
docs/reference-notes.md explains the choices and where its numerics differ from SPEC §4.

Import this module only after `require_hf()` (or pytest.importorskip) has confirmed torch and
transformers are installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Set before transformers is imported anywhere: a reference that silently downloads is no reference.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REASON = "torch and transformers are needed for the Hugging Face reference (pip install torch transformers)"


def require_hf() -> tuple[Any, Any]:
    """(torch, transformers), or skip the calling test with a clear reason when either is missing."""
    import pytest

    torch = pytest.importorskip("torch", reason=_REASON)
    transformers = pytest.importorskip("transformers", reason=_REASON)
    return torch, transformers


def load_hf_model(hf_dir: str | os.PathLike) -> Any:
    """GptOssForCausalLM from a local HF directory: CPU, bf16, eager attention and experts, MXFP4 -> bf16.

    Raises ValueError if the directory is not a complete gpt_oss checkpoint: any missing, unexpected or
    mis-shaped tensor (transformers would otherwise leave it randomly initialised and carry on).
    """
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir}: no config.json, not a Hugging Face checkpoint directory")
    model, info = GptOssForCausalLM.from_pretrained(
        hf_dir,
        dtype=torch.bfloat16,
        attn_implementation="eager",  # the sink softmax is written out in eager_attention_forward
        experts_implementation="eager",  # the per-expert loop of GptOssExperts.forward, not grouped_mm
        quantization_config=Mxfp4Config(dequantize=True),  # no triton on CPU: MXFP4 -> bf16 at load
        local_files_only=True,
        output_loading_info=True,
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise ValueError(f"{hf_dir}: transformers could not load every tensor: {problems}")
    model.eval()
    return model


def _bf16_numpy(t: Any) -> np.ndarray:
    """A bf16 tensor as float32 numpy (exact)."""
    import torch

    return t.detach().to(torch.float32).numpy()


def hf_logits(model: Any, tokens: Sequence[int]) -> np.ndarray:
    """Logits [T, V] as float32 (HF computes them in bf16) for a fresh sequence."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    return _bf16_numpy(out.logits[0])


def hf_hidden_states(
    model: Any, tokens: Sequence[int], routes: list | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """The residual stream entering each decoder layer and the one leaving the last (before the final
    norm) as float32 [T, H] arrays, plus the logits [T, V].

    Hooks are used rather than output_hidden_states because transformers replaces the last of those
    with the *normed* final state. If `routes` is a list, each layer's router output
    (indices [T, k], weights [T, k], logits [T, E]) is appended to it.
    """
    import torch

    layers = model.model.layers
    streams: list[np.ndarray] = []
    handles = []

    def grab_input(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        streams.append(_bf16_numpy(hidden[0]))

    def grab_output(module: Any, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        streams.append(_bf16_numpy(hidden[0]))

    def grab_route(module: Any, args: tuple, output: Any) -> None:
        logits, scores, indices = output
        routes.append((indices.numpy().astype(np.int64), _bf16_numpy(scores), _bf16_numpy(logits)))

    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(grab_input, with_kwargs=True))
            if routes is not None:
                handles.append(layer.mlp.router.register_forward_hook(grab_route))
        handles.append(layers[-1].register_forward_hook(grab_output))
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return streams, _bf16_numpy(out.logits[0])


def _additive_mask(positions: Any, sliding_window: int | None, dtype: Any) -> Any:
    """The eager-attention mask [1, 1, T, T]: 0 where key j is visible to query i, dtype-min elsewhere
    (the same convention as transformers' masking_utils for eager attention)."""
    import torch

    qp = positions[:, None]
    kp = positions[None, :]
    visible = kp <= qp
    if sliding_window:
        visible &= kp > qp - sliding_window
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def hf_layer_forward(model: Any, layer: int, hidden_in: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Run decoder layer `layer` alone on hidden_in [T, H] (values rounded to bf16) at `positions`;
    the tokens attend only to each other. Returns the layer's output [T, H] as float32."""
    import torch

    decoder = model.model.layers[layer]
    x = torch.from_numpy(np.ascontiguousarray(hidden_in, dtype=np.float32)).to(torch.bfloat16)[None]
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    if pos.shape != (x.shape[1],):
        raise ValueError(f"hf_layer_forward: {x.shape[1]} tokens but {tuple(pos.shape)} positions")
    window = model.config.sliding_window if model.config.layer_types[layer] == "sliding_attention" else None
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(x, pos[None])
        out = decoder(
            x,
            attention_mask=_additive_mask(pos, window, x.dtype),
            position_ids=pos[None],
            position_embeddings=cos_sin,
            use_cache=False,
        )
    out = out[0] if isinstance(out, tuple) else out
    return _bf16_numpy(out[0])


def hf_generate_greedy(model: Any, tokens: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with HF's DynamicCache: prefill the prompt, then one token per step.

    Returns (the n new tokens, logits [n, V] float32 that chose them). No stop tokens: exactly n steps.
    """
    import torch

    if not tokens:
        raise ValueError("hf_generate_greedy needs at least one prompt token")
    chosen: list[int] = []
    step_logits: list[np.ndarray] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=True)
        for _ in range(n):
            logits = _bf16_numpy(out.logits[0, -1])
            nxt = int(np.argmax(logits))
            chosen.append(nxt)
            step_logits.append(logits)
            if len(chosen) == n:
                break
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), cache=out.cache, use_cache=True)
    return chosen, np.stack(step_logits) if step_logits else np.zeros((0, 0), np.float32)
