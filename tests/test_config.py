import dataclasses
import json
import math

import pytest

from gptoss_stream.weights.config import (
    FULL, ORIGINAL_KEYS, SLIDING, ModelConfig, config_flavour, default_layer_types, load_config,
)

# openai/gpt-oss-20b original/config.json (SPEC §1).
OFFICIAL_20B_ORIGINAL = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096, "rope_theta": 150000,
    "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}

# openai/gpt-oss-20b config.json as published on the Hub.
PUBLISHED_20B_HF = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_presets_match_spec_table():
    for name, layers, experts in (("20b", 24, 32), ("120b", 36, 128)):
        c = ModelConfig.preset(name)
        assert (c.num_hidden_layers, c.num_experts, c.experts_per_token) == (layers, experts, 4)
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.head_dim) == (201088, 2880, 2880, 64)
        assert (c.num_attention_heads, c.num_key_value_heads, c.sliding_window) == (64, 8, 128)
        assert (c.initial_context_length, c.rope_theta, c.swiglu_limit) == (4096, 150000.0, 7.0)
        assert (c.rope_scaling_factor, c.rope_ntk_alpha, c.rope_ntk_beta) == (32.0, 1.0, 32.0)
        assert c.max_context == 131072
        assert c.qkv_dim == 5120 and c.q_dim == 4096
        c.validate()
    assert ModelConfig.from_original_json(OFFICIAL_20B_ORIGINAL) == ModelConfig.preset("20b")


def test_tiny_preset_keeps_tokenizer_and_rope_and_has_both_layer_kinds():
    t, big = ModelConfig.preset("tiny"), ModelConfig.preset("20b")
    assert t.vocab_size == 201088 and t.head_dim == 64 and t.sliding_window == 128
    assert (t.rope_theta, t.rope_scaling_factor, t.rope_ntk_alpha, t.rope_ntk_beta, t.initial_context_length) == (
        big.rope_theta, big.rope_scaling_factor, big.rope_ntk_alpha, big.rope_ntk_beta, big.initial_context_length)
    assert t.hidden_size % 32 == 0 and t.intermediate_size % 32 == 0
    assert t.num_attention_heads % t.num_key_value_heads == 0 and t.num_attention_heads > t.num_key_value_heads
    assert t.experts_per_token == 4 and t.num_experts > 4
    assert SLIDING in t.layer_types and FULL in t.layer_types
    # 201088 x hidden bf16 must stay small enough for fast tests
    assert t.vocab_size * t.hidden_size * 2 <= 32 << 20


def test_layer_types_even_layers_slide():
    c = ModelConfig.preset("20b")
    assert [c.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert default_layer_types(3) == (SLIDING, FULL, SLIDING)


def test_original_json_round_trip_has_exactly_the_official_keys():
    for name in ("tiny", "20b", "120b"):
        c = ModelConfig.preset(name)
        d = c.to_original_json()
        assert list(d) == list(ORIGINAL_KEYS)
        assert ModelConfig.from_original_json(json.loads(json.dumps(d))) == c
    assert ModelConfig.preset("20b").to_original_json()["rope_theta"] == 150000


def test_hf_json_round_trip_and_published_config():
    c = ModelConfig.preset("20b")
    assert ModelConfig.from_hf_json(PUBLISHED_20B_HF) == c
    d = c.to_hf_json()
    # Same keys and values as the published file, plus torch_dtype (the weights are bf16).
    assert set(d) == set(PUBLISHED_20B_HF) | {"torch_dtype"}
    assert {k: v for k, v in d.items() if k != "torch_dtype"} == PUBLISHED_20B_HF
    for name in ("tiny", "120b"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_hf_json(json.loads(json.dumps(cfg.to_hf_json()))) == cfg


def test_hf_json_in_transformers_5_form():
    # transformers >= 5 saves rope_parameters (with rope_theta inside) instead of rope_scaling.
    d = dict(PUBLISHED_20B_HF)
    rope = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    d["rope_parameters"] = rope
    assert ModelConfig.from_hf_json(d) == ModelConfig.preset("20b")
    d2 = dict(PUBLISHED_20B_HF)
    del d2["layer_types"]
    assert ModelConfig.from_hf_json(d2).layer_types == ModelConfig.preset("20b").layer_types


@pytest.mark.parametrize("change, words", [
    (dict(hidden_size=100), "hidden_size"),
    (dict(intermediate_size=2881), "intermediate_size"),
    (dict(num_key_value_heads=7), "num_key_value_heads"),
    (dict(experts_per_token=33), "experts_per_token"),
    (dict(num_hidden_layers=0, layer_types=()), "num_hidden_layers"),
    (dict(head_dim=63), "head_dim"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(rope_theta=math.nan), "rope_theta"),
    (dict(rope_ntk_beta=1.0), "rope_ntk_beta"),
    (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
    (dict(swiglu_limit=-1.0), "swiglu_limit"),
    (dict(sliding_window="128"), "sliding_window"),
    (dict(num_experts=True), "num_experts"),
    (dict(layer_types=("sliding_attention",) * 23), "layer_types"),
    (dict(layer_types=("global",) * 24), "layer_types"),
])
def test_validate_rejects_impossible_values(change, words):
    bad = dataclasses.replace(ModelConfig.preset("20b"), **change)
    with pytest.raises(ValueError, match=words):
        bad.validate()


def test_with_overrides():
    c = ModelConfig.preset("20b").with_overrides(num_hidden_layers=2, num_experts=None)
    assert c.num_hidden_layers == 2 and c.layer_types == (SLIDING, FULL) and c.num_experts == 32
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.preset("20b").with_overrides(hidden_size=65)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.preset("20b").with_overrides(depth=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("7b")


def test_load_config_from_dir_or_file_either_flavour(tmp_path):
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps(OFFICIAL_20B_ORIGINAL))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(PUBLISHED_20B_HF))
    want = ModelConfig.preset("20b")
    assert load_config(tmp_path / "orig") == want
    assert load_config(tmp_path / "orig" / "config.json") == want
    assert load_config(tmp_path / "hf") == want
    assert config_flavour(OFFICIAL_20B_ORIGINAL) == "original" and config_flavour(PUBLISHED_20B_HF) == "hf"


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    f = tmp_path / "config.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config(tmp_path)
    f.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither"):
        load_config(tmp_path)
    d = dict(OFFICIAL_20B_ORIGINAL)
    del d["head_dim"]
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="head_dim"):
        load_config(tmp_path)
    f.write_text(json.dumps(dict(OFFICIAL_20B_ORIGINAL, num_key_value_heads=6)))
    with pytest.raises(ValueError, match=r"config.json.*num_key_value_heads"):
        load_config(tmp_path)
    f.write_text(json.dumps(dict(PUBLISHED_20B_HF, model_type="llama")))
    with pytest.raises(ValueError, match="model_type"):
        load_config(tmp_path)
    f.write_text(json.dumps(dict(PUBLISHED_20B_HF, rope_scaling={"rope_type": "linear", "factor": 2.0})))
    with pytest.raises(ValueError, match="rope_type"):
        load_config(tmp_path)
