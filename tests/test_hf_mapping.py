"""Proof that our original <-> Hugging Face mapping is the one transformers uses.

The facts, from transformers' gpt_oss code (convert_gpt_oss_weights_to_hf.py, modeling_gpt_oss.py,
integrations/mxfp4.py):
- names: embedding -> model.embed_tokens, unembedding -> lm_head, norm.scale -> model.norm.weight,
  block.N.attn.norm.scale -> model.layers.N.input_layernorm.weight, mlp.norm.scale ->
  post_attention_layernorm.weight, attn.out -> self_attn.o_proj, attn.sinks -> self_attn.sinks,
  mlp.gate -> mlp.router, mlp1_weight.{blocks,scales} -> mlp.experts.gate_up_proj_{blocks,scales},
  mlp1_bias -> gate_up_proj_bias, mlp2_* -> down_proj_*;
- attn.qkv is split by rows into q_proj (nq*hd), k_proj (nkv*hd), v_proj (nkv*hd);
- MXFP4 blocks/scales are copied as they are; transformers transposes only after dequantizing
  (gate_up_proj is [E, H, 2I] for x @ W) and reads gate/up interleaved ([..., ::2] / [..., 1::2]).

The conversion below is written independently of gptoss_stream.checkpoint from those facts.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402
from gptoss_stream.weights.config import ModelConfig  # noqa: E402

FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)

RENAMES = [  # (original regex, HF replacement), applied to one name
    (r"^embedding\.weight$", "model.embed_tokens.weight"),
    (r"^unembedding\.weight$", "lm_head.weight"),
    (r"^norm\.scale$", "model.norm.weight"),
    (r"^block\.(\d+)\.attn\.norm\.scale$", r"model.layers.\1.input_layernorm.weight"),
    (r"^block\.(\d+)\.mlp\.norm\.scale$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^block\.(\d+)\.attn\.out\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^block\.(\d+)\.attn\.sinks$", r"model.layers.\1.self_attn.sinks"),
    (r"^block\.(\d+)\.mlp\.gate\.(weight|bias)$", r"model.layers.\1.mlp.router.\2"),
    (r"^block\.(\d+)\.mlp\.mlp1_weight\.(blocks|scales)$", r"model.layers.\1.mlp.experts.gate_up_proj_\2"),
    (r"^block\.(\d+)\.mlp\.mlp1_bias$", r"model.layers.\1.mlp.experts.gate_up_proj_bias"),
    (r"^block\.(\d+)\.mlp\.mlp2_weight\.(blocks|scales)$", r"model.layers.\1.mlp.experts.down_proj_\2"),
    (r"^block\.(\d+)\.mlp\.mlp2_bias$", r"model.layers.\1.mlp.experts.down_proj_bias"),
]
QKV = re.compile(r"^block\.(\d+)\.attn\.qkv\.(weight|bias)$")


def to_hf(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for name, t in sd.items():
        if m := QKV.match(name):
            p = f"model.layers.{m[1]}.self_attn"
            out[f"{p}.q_proj.{m[2]}"] = t[:q]
            out[f"{p}.k_proj.{m[2]}"] = t[q:q + kv]
            out[f"{p}.v_proj.{m[2]}"] = t[q + kv:]
            continue
        hits = [re.sub(pat, rep, name) for pat, rep in RENAMES if re.match(pat, name)]
        assert len(hits) == 1, name
        out[hits[0]] = t
    return out


def to_original(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, t in sd.items():
        if m := re.match(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", name):
            p = f"model.layers.{m[1]}.self_attn"
            out[f"block.{m[1]}.attn.qkv.{m[2]}"] = torch.cat(
                [t, sd[f"{p}.k_proj.{m[2]}"], sd[f"{p}.v_proj.{m[2]}"]])
        elif re.match(r"^model\.layers\.\d+\.self_attn\.[kv]_proj\.", name):
            continue
        else:
            hits = [orig for orig in _original_names(cfg) if re.sub(*_rule(orig), orig) == name]
            assert len(hits) == 1, name
            out[hits[0]] = t
    return out


def _rule(orig: str) -> tuple[str, str]:
    return next((pat, rep) for pat, rep in RENAMES if re.match(pat, orig))


def _original_names(cfg: ModelConfig) -> list[str]:
    names = ["embedding.weight", "unembedding.weight", "norm.scale"]
    for n in range(cfg.num_hidden_layers):
        names += [f"block.{n}.{s}" for s in (
            "attn.norm.scale", "mlp.norm.scale", "attn.out.weight", "attn.out.bias", "attn.sinks", "mlp.gate.weight",
            "mlp.gate.bias", "mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias",
            "mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales", "mlp.mlp2_bias")]
    return names


def load_dir(d) -> dict:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def bits(t):  # exact comparison of any dtype
    return t.contiguous().view(torch.uint8)


def dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Plain MXFP4 -> float32 (SPEC §3): [..., G, 16] u8 + [..., G] u8 -> [..., G*32]."""
    vals = np.stack([FP4[blocks & 0x0F], FP4[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def state_dicts(tiny_original, tiny_hf):
    return load_dir(tiny_original), load_dir(tiny_hf)


def test_original_converted_like_transformers_equals_our_hf_files(state_dicts):
    orig, hf = state_dicts
    cfg = ModelConfig.preset("tiny")
    converted = to_hf(orig, cfg)
    assert set(converted) == set(hf)
    for name, t in converted.items():
        assert t.dtype == hf[name].dtype and t.shape == hf[name].shape, name
        assert torch.equal(bits(t), bits(hf[name])), name


def test_hf_converted_back_equals_our_original_file(state_dicts):
    orig, hf = state_dicts
    back = to_original(hf, ModelConfig.preset("tiny"))
    assert set(back) == set(orig)
    for name, t in back.items():
        assert t.shape == orig[name].shape and torch.equal(bits(t), bits(orig[name])), name


def test_dequantized_experts_equal_in_both_formats_and_in_transformers(tiny_original, tiny_hf, state_dicts):
    _, hf = state_dicts
    with Checkpoint.open(tiny_original) as a, Checkpoint.open(tiny_hf) as b:
        cfg = a.config
        for n in range(cfg.num_hidden_layers):
            for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
                wa = dequant(a.tensor(f"block.{n}.mlp.{ours}_weight.blocks"), a.tensor(f"block.{n}.mlp.{ours}_weight.scales"))
                wb = dequant(b.tensor(f"block.{n}.mlp.{ours}_weight.blocks"), b.tensor(f"block.{n}.mlp.{ours}_weight.scales"))
                assert np.array_equal(wa, wb)
                # transformers' own MXFP4 dequantization of the HF tensors: [E, in, out] (x @ W)
                p = f"model.layers.{n}.mlp.experts.{theirs}"
                t = convert_moe_packed_tensors(hf[p + "_blocks"], hf[p + "_scales"], dtype=torch.bfloat16)
                assert t.shape == (wa.shape[0], wa.shape[2], wa.shape[1])
                assert np.array_equal(t.float().numpy().transpose(0, 2, 1), wa)
                # and per expert through Checkpoint.expert()
                for e in (0, cfg.num_experts - 1):
                    ea, eb = a.expert(n, e), b.expert(n, e)
                    xa = dequant(getattr(ea, f"{ours}_blocks"), getattr(ea, f"{ours}_scales"))
                    xb = dequant(getattr(eb, f"{ours}_blocks"), getattr(eb, f"{ours}_scales"))
                    assert np.array_equal(xa, wa[e]) and np.array_equal(xb, wa[e])


@pytest.fixture(scope="module")
def hf_model(tiny_hf):
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    model, info = GptOssForCausalLM.from_pretrained(
        str(tiny_hf), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_transformers_loads_our_hf_checkpoint_and_sees_our_weights(hf_model, tiny_original):
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (8, 4, 4)
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 32.0
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with Checkpoint.open(tiny_original) as ck:
        assert ModelConfig.from_hf_json(cfg.to_dict()) == ck.config
        assert np.array_equal(sd["model.embed_tokens.weight"].numpy(), bf16(ck.embedding()))
        assert np.array_equal(sd["lm_head.weight"].numpy(), bf16(ck.unembedding()))
        assert np.array_equal(sd["model.norm.weight"].numpy(), bf16(ck.final_norm()))
        for n in range(ck.config.num_hidden_layers):
            lw, p = ck.layer(n), f"model.layers.{n}."
            pairs = {
                "input_layernorm.weight": lw.attn_norm, "post_attention_layernorm.weight": lw.mlp_norm,
                "self_attn.q_proj.weight": lw.q_weight, "self_attn.q_proj.bias": lw.q_bias,
                "self_attn.k_proj.weight": lw.k_weight, "self_attn.k_proj.bias": lw.k_bias,
                "self_attn.v_proj.weight": lw.v_weight, "self_attn.v_proj.bias": lw.v_bias,
                "self_attn.o_proj.weight": lw.out_weight, "self_attn.o_proj.bias": lw.out_bias,
                "self_attn.sinks": lw.sinks, "mlp.router.weight": lw.gate_weight, "mlp.router.bias": lw.gate_bias,
                "mlp.experts.gate_up_proj_bias": ck.tensor(f"block.{n}.mlp.mlp1_bias"),
                "mlp.experts.down_proj_bias": ck.tensor(f"block.{n}.mlp.mlp2_bias"),
            }
            for name, view in pairs.items():
                assert np.array_equal(sd[p + name].numpy(), bf16(view)), p + name
            w1 = dequant(ck.tensor(f"block.{n}.mlp.mlp1_weight.blocks"), ck.tensor(f"block.{n}.mlp.mlp1_weight.scales"))
            w2 = dequant(ck.tensor(f"block.{n}.mlp.mlp2_weight.blocks"), ck.tensor(f"block.{n}.mlp.mlp2_weight.scales"))
            assert np.array_equal(sd[p + "mlp.experts.gate_up_proj"].numpy(), w1.transpose(0, 2, 1))
            assert np.array_equal(sd[p + "mlp.experts.down_proj"].numpy(), w2.transpose(0, 2, 1))


def test_transformers_expert_and_router_compute_what_spec_says_on_original_views(hf_model, tiny_original):
    """SPEC §4 MoE math on our original-format views == transformers' modules on the HF checkpoint.

    This pins the glu/linear interleaving (glu = h[0::2], lin = h[1::2]) and the orientation of
    every matrix, which tensor equality alone cannot."""
    model, _ = hf_model
    with Checkpoint.open(tiny_original) as ck:
        cfg = ck.config
        layer = 3
        x = np.random.default_rng(0).standard_normal((5, cfg.hidden_size)).astype(np.float32)
        mlp = model.model.layers[layer].mlp
        lw = ck.layer(layer)
        with torch.no_grad():
            logits, scores, idx = mlp.router(torch.from_numpy(x))
        want_logits = x @ bf16(lw.gate_weight).T + bf16(lw.gate_bias)
        np.testing.assert_allclose(logits.numpy(), want_logits, rtol=1e-5, atol=1e-5)
        top = np.argsort(-want_logits, axis=1)[:, :cfg.experts_per_token]
        assert np.array_equal(np.sort(idx.numpy(), axis=1), np.sort(top, axis=1))
        for e in (0, 5):
            ew = ck.expert(layer, e)
            h = x @ dequant(ew.mlp1_blocks, ew.mlp1_scales).T + bf16(ew.mlp1_bias)
            glu = np.minimum(h[:, 0::2], cfg.swiglu_limit)
            lin = np.clip(h[:, 1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
            a = glu / (1 + np.exp(-1.702 * glu)) * (lin + 1)
            want = a @ dequant(ew.mlp2_blocks, ew.mlp2_scales).T + bf16(ew.mlp2_bias)
            with torch.no_grad():
                got = mlp.experts(torch.from_numpy(x), torch.full((5, 1), e), torch.ones(5, 1)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
