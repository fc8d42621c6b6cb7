"""Model hyper-parameters: one dataclass read from either config.json flavour (SPEC §1, §2).

The original checkpoint ships `original/config.json` with 16 keys named like OpenAI's reference
`ModelConfig`; the Hugging Face layout ships a `GptOssConfig` (transformers) with HF names
(`num_local_experts`, `num_experts_per_tok`, `rope_scaling`, `layer_types`, ...). Both describe the
same model; `ModelConfig` is the single in-memory form and can write either file back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_stream.weights.jsonio import MAX_CONFIG_BYTES, read_json_file

SLIDING = "sliding_attention"
FULL = "full_attention"

# The exact key set (and order) of the official original/config.json.
ORIGINAL_KEYS: tuple[str, ...] = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "swiglu_limit",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "rope_scaling_factor",
    "rope_ntk_alpha",
    "rope_ntk_beta",
)

_INT_FIELDS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
    "initial_context_length",
)
# Upper bounds on the integer fields, checked before anything is built from them (a damaged config.json
# saying 2**40 layers must fail at once, not build a tuple of 2**40 layer types). Generous: gpt-oss-120b has
# 36 layers of 128 experts, 2880 wide, a vocab of 201088, a 4096-token initial context.
MAX_INT_FIELDS: dict[str, int] = {
    "num_hidden_layers": 1024, "num_experts": 4096, "experts_per_token": 64, "vocab_size": 1 << 22,
    "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "head_dim": 1024, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "sliding_window": 1 << 20, "initial_context_length": 1 << 20,
}
# Layers x experts: the records a repacked checkpoint lists, the views an expert store may build.
MAX_EXPERTS_TOTAL = 1 << 16
MAX_ROPE_SCALING_FACTOR = 1024.0

_FLOAT_FIELDS = (
    "swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta", "rms_norm_eps",
)

# Token ids written into the HF config, as in the published openai/gpt-oss-* config.json.
HF_EOS_TOKEN_ID = 200002  # <|return|>
HF_PAD_TOKEN_ID = 199999  # <|endoftext|>
HF_TRANSFORMERS_VERSION = "4.55.0.dev0"  # the version string the published configs carry
# MXFP4 covers only the experts: attention, router, embeddings and lm_head stay bf16.
HF_MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

MXFP4_BLOCK = 32  # values per MXFP4 block (SPEC §3)


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    # gpt-oss alternates: even layers use the 128-token sliding window, odd layers see everything.
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    swiglu_limit: float
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    initial_context_length: int
    rope_theta: float
    rope_scaling_factor: float
    rope_ntk_alpha: float
    rope_ntk_beta: float
    layer_types: tuple[str, ...]  # per layer SLIDING | FULL
    rms_norm_eps: float = 1e-5

    # ---------------------------------------------------------------- derived sizes
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def max_context(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    # ---------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first impossible value; returns self so calls can chain."""
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"config: {name} must be an integer, got {v!r:.80}")
            if v <= 0:
                raise ValueError(f"config: {name} must be positive, got {v}")
            if v > MAX_INT_FIELDS[name]:
                raise ValueError(f"config: {name} is {v}, more than gptoss supports ({MAX_INT_FIELDS[name]}; "
                                 f"a damaged config.json?)")
        if self.num_hidden_layers * self.num_experts > MAX_EXPERTS_TOTAL:
            raise ValueError(f"config: {self.num_hidden_layers} layers of {self.num_experts} experts is more than "
                             f"gptoss supports ({MAX_EXPERTS_TOTAL} experts in all)")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"config: {name} must be a finite number, got {v!r:.80}")
            if v <= 0:
                raise ValueError(f"config: {name} must be positive, got {v}")
        if self.hidden_size % MXFP4_BLOCK:
            raise ValueError(f"config: hidden_size {self.hidden_size} must be a multiple of {MXFP4_BLOCK} (MXFP4 block)")
        if self.intermediate_size % MXFP4_BLOCK:
            raise ValueError(
                f"config: intermediate_size {self.intermediate_size} must be a multiple of {MXFP4_BLOCK} (MXFP4 block)"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim {self.head_dim} must be even (RoPE rotates half-pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (GQA)"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"config: experts_per_token {self.experts_per_token} exceeds num_experts {self.num_experts}"
            )
        if not 1 <= self.rope_scaling_factor <= MAX_ROPE_SCALING_FACTOR:
            raise ValueError(f"config: rope_scaling_factor {self.rope_scaling_factor} must be between 1 and "
                             f"{MAX_ROPE_SCALING_FACTOR:g}")
        if self.rope_ntk_beta <= self.rope_ntk_alpha:
            # YaRN's ramp divides by (high - low), which is zero or negative unless beta > alpha.
            raise ValueError(
                f"config: rope_ntk_beta {self.rope_ntk_beta} must be greater than rope_ntk_alpha {self.rope_ntk_alpha}"
            )
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_hidden_layers:
            count = len(self.layer_types) if isinstance(self.layer_types, (tuple, list)) else self.layer_types
            raise ValueError(
                f"config: layer_types has {count!r:.80} entries for {self.num_hidden_layers} layers"
            )
        for i, t in enumerate(self.layer_types):
            if not isinstance(t, str) or t not in (SLIDING, FULL):
                raise ValueError(f"config: layer_types[{i}] = {t!r:.80}; expected {SLIDING!r} or {FULL!r}")
        return self

    # ---------------------------------------------------------------- original/config.json
    @classmethod
    def from_original_json(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ORIGINAL_KEYS if k not in d]
        if missing:
            raise ValueError(f"config: original config.json lacks {', '.join(missing)}")
        values = {k: d[k] for k in ORIGINAL_KEYS}
        values = _coerce(values)
        return cls(**values, layer_types=_default_types(values["num_hidden_layers"])).validate()

    def to_original_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k in ORIGINAL_KEYS:
            v = getattr(self, k)
            d[k] = float(v) if k in _FLOAT_FIELDS else v
        # The official file writes theta as an integer (150000).
        if float(self.rope_theta).is_integer():
            d["rope_theta"] = int(self.rope_theta)
        return d

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_json(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"config: model_type is {d.get('model_type')!r:.80}, expected 'gpt_oss'")
        # transformers >= 5 saves `rope_parameters` (with rope_theta inside); the published files use `rope_scaling`.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config: rope_scaling must be an object, got {rope!r:.80}")
        if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ValueError(f"config: rope_type {rope.get('rope_type')!r:.80} is not supported (gpt-oss uses 'yarn')")

        def need(key: str, *alternatives: Any) -> Any:
            for v in (d.get(key), *alternatives):
                if v is not None:
                    return v
            raise ValueError(f"config: HF config.json lacks {key}")

        layers = need("num_hidden_layers")
        initial = rope.get("original_max_position_embeddings") or d.get("initial_context_length")
        if initial is None:
            raise ValueError("config: HF config.json lacks rope_scaling.original_max_position_embeddings")
        values = dict(
            num_hidden_layers=layers,
            num_experts=need("num_local_experts", d.get("num_experts")),
            experts_per_token=need("num_experts_per_tok", d.get("experts_per_token")),
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            swiglu_limit=d.get("swiglu_limit", 7.0),
            head_dim=need("head_dim"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=need("num_key_value_heads"),
            sliding_window=need("sliding_window"),
            initial_context_length=initial,
            rope_theta=need("rope_theta", rope.get("rope_theta")),
            rope_scaling_factor=rope.get("factor", 1.0),
            rope_ntk_alpha=rope.get("beta_slow", 1.0),
            rope_ntk_beta=rope.get("beta_fast", 32.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        )
        values = _coerce(values)
        types = d.get("layer_types")
        if types is None:
            types = _default_types(values["num_hidden_layers"])
        elif not isinstance(types, list):
            raise ValueError(f"config: layer_types must be a list, got {types!r:.80}")
        return cls(**values, layer_types=tuple(types)).validate()

    def to_hf_json(self) -> dict[str, Any]:
        """The config.json of the HF layout, with the keys of the published openai/gpt-oss-* configs."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": HF_EOS_TOKEN_ID,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_context,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": HF_PAD_TOKEN_ID,
            "quantization_config": {"modules_to_not_convert": list(HF_MODULES_TO_NOT_CONVERT), "quant_method": "mxfp4"},
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": float(self.rope_ntk_beta),
                "beta_slow": float(self.rope_ntk_alpha),
                "factor": float(self.rope_scaling_factor),
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": int(self.rope_theta) if float(self.rope_theta).is_integer() else self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": float(self.swiglu_limit),
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": HF_TRANSFORMERS_VERSION,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        return d

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def with_overrides(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields replaced (None values ignored); layer_types follows num_hidden_layers."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(sorted(unknown))}")
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = _default_types(changes["num_hidden_layers"])
        return dataclasses.replace(self, **changes).validate()


def _default_types(layers: Any) -> tuple[str, ...]:
    """default_layer_types for a layer count straight from a file: none for a count validate() will refuse."""
    ok = isinstance(layers, int) and not isinstance(layers, bool) and 0 < layers <= MAX_INT_FIELDS["num_hidden_layers"]
    return default_layer_types(layers) if ok else ()


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    # JSON writes 32.0 for floats and 150000 for theta; accept integral floats for int fields
    # (e.g. 4096.0) but leave anything else as-is so validate() can name it.
    out = dict(values)
    for k, v in values.items():
        if k in _INT_FIELDS and isinstance(v, float) and v.is_integer():
            out[k] = int(v)
        elif k in _FLOAT_FIELDS and isinstance(v, int) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _official(layers: int, experts: int) -> ModelConfig:
    return ModelConfig(
        num_hidden_layers=layers, num_experts=experts, experts_per_token=4, vocab_size=201088,
        hidden_size=2880, intermediate_size=2880, swiglu_limit=7.0, head_dim=64, num_attention_heads=64,
        num_key_value_heads=8, sliding_window=128, initial_context_length=4096, rope_theta=150000.0,
        rope_scaling_factor=32.0, rope_ntk_alpha=1.0, rope_ntk_beta=32.0, layer_types=default_layer_types(layers),
    )


PRESETS: dict[str, ModelConfig] = {
    "20b": _official(24, 32),
    "120b": _official(36, 128),
    # Tiny keeps everything the tokenizer and YaRN see (vocab, head_dim, RoPE, window) and shrinks
    # the rest so a forward pass takes milliseconds: 4 layers = 2 sliding + 2 full, GQA ratio 2.
    "tiny": dataclasses.replace(
        _official(4, 8), hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
    ),
}


def config_flavour(d: dict[str, Any]) -> str:
    """'hf' or 'original' for a parsed config.json (ValueError if it is neither)."""
    if isinstance(d, dict):
        if "model_type" in d or "num_local_experts" in d:
            return "hf"
        if "num_experts" in d and "rope_scaling_factor" in d:
            return "original"
    raise ValueError("config: neither an original gpt-oss config.json nor a Hugging Face GptOssConfig")


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    d = read_json_file(path, MAX_CONFIG_BYTES, "config.json")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def load_config(path: str | Path) -> ModelConfig:
    """Read a directory's config.json (or the file itself), original or HF flavour, validated."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    return config_from_json(read_config_json(file), str(file))


def config_from_json(d: dict[str, Any], where: str) -> ModelConfig:
    """The validated ModelConfig of a parsed config.json of either flavour; ValueError prefixed with `where`."""
    try:
        if config_flavour(d) == "hf":
            return ModelConfig.from_hf_json(d)
        return ModelConfig.from_original_json(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def layer_capacity(config: ModelConfig, layer: int, context_length: int, max_chunk: int) -> int:
    """Rows of a layer's cache (see engine.kvcache.KVCache): the context length, or a sliding layer's ring."""
    if config.is_sliding(layer):
        return min(context_length, config.sliding_window + max_chunk - 1)
    return context_length
