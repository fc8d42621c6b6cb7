"""Coverage-guided fuzzing (atheris, libFuzzer) of the two parsers every checkpoint goes through: the
safetensors header (weights/safetensors_file.parse_header) and config.json (weights/config.py, both
flavours, parsed by weights/jsonio.py as load_config does).

    pip install atheris            # not a dependency of gptoss: a wheel for CPython 3.11 on x86-64 Linux
    python tools/fuzz_atheris.py --make-corpus /tmp/fuzz-corpus          # seeds from a micro checkpoint
    nice -n 19 python tools/fuzz_atheris.py /tmp/fuzz-corpus -max_total_time=660 -rss_limit_mb=2048 \\
        -timeout=10 -print_final_stats=1

The first byte of an input picks the parser (even: header, odd: config.json), the rest is the file's text.
Any exception other than ValueError (CheckpointError is one) is a finding, and so are an input that takes
longer than -timeout seconds or more than -rss_limit_mb of memory (libFuzzer's own checks).
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A file size that lets every offset of a real header fit: the parser then checks everything but the data.
FILE_SIZE = 1 << 36


def make_corpus(out: Path) -> None:
    """Seeds: every safetensors header and config.json of the micro checkpoint in both layouts."""
    from gptoss_stream.weights.config import ModelConfig
    from gptoss_stream.weights.synthetic import make_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.preset("tiny").with_overrides(
            num_hidden_layers=2, vocab_size=512, hidden_size=32, intermediate_size=32, num_experts=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        make_checkpoint(tmp, cfg, format="both", seed=1, max_shard_bytes=20_000, progress=False)
        n = 0
        for p in sorted(Path(tmp).rglob("*")):
            if p.suffix == ".safetensors":
                raw = p.read_bytes()
                (length,) = struct.unpack("<Q", raw[:8])
                (out / f"header-{n}").write_bytes(b"\x00" + raw[8:8 + length])
            elif p.name == "config.json":
                (out / f"config-{n}").write_bytes(b"\x01" + p.read_bytes())
            n += 1
        for name, cfg in (("tiny", ModelConfig.preset("tiny")), ("20b", ModelConfig.preset("20b"))):
            (out / f"config-{name}-original").write_bytes(b"\x01" + json.dumps(cfg.to_original_json()).encode())
            (out / f"config-{name}-hf").write_bytes(b"\x01" + json.dumps(cfg.to_hf_json()).encode())
    print(f"{len(list(out.iterdir()))} seeds in {out}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        return
    import atheris

    with atheris.instrument_imports():
        from gptoss_stream.weights import config as config_mod
        from gptoss_stream.weights import jsonio, safetensors_file

    def one_input(data: bytes) -> None:
        if not data:
            return
        kind, raw = data[0] & 1, data[1:]
        try:
            if kind == 0:
                safetensors_file.parse_header(raw, "fuzz.safetensors", FILE_SIZE)
            else:
                # What load_config runs on a config.json's bytes (less the read: MAX_CONFIG_BYTES bounds it).
                d = jsonio.parse_json(raw, "config.json")
                if not isinstance(d, dict):
                    return  # read_config_json's "expected a JSON object"
                config_mod.config_from_json(d, "config.json")
        except ValueError:
            pass  # a clean refusal; anything else propagates and atheris reports it with the input

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
