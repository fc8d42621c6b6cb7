"""Shared pytest fixtures.

Checkpoint fixtures (session-scoped: generated once per test run, read-only for tests):

- `tiny_checkpoint` -> Path of a directory holding the `tiny` preset (config.ModelConfig.preset("tiny"):
  4 layers (2 sliding, 2 full), hidden 64, 8 experts top-4, 4 q / 2 kv heads of 64, the real
  201088-row vocab and RoPE settings) written with seed 0 in both layouts:
      <dir>/original/{config.json, model.safetensors}
      <dir>/hf/{config.json, model.safetensors.index.json, model-00000-of-00001.safetensors,
                model-00001-of-00001.safetensors}   (HF sharded at 30 MB to exercise multi-shard reads)
  `Checkpoint.open(tiny_checkpoint)` opens original/; pass `/ "hf"` (or format="hf") for the HF copy.
  Both hold bit-identical weights. About 100 MB on disk, ~0.5 s to generate.
- `tiny_original`, `tiny_hf` -> the two subdirectories.
- `micro_config` / `micro_checkpoint` -> a much smaller model (vocab 512, hidden 32, 2 layers,
  4 experts) in both layouts, for tests that copy and corrupt files.
- `full_width_checkpoint` -> gpt-oss-20b's real widths with 2 layers (one sliding, one full), HF layout
  only, seed 7: 3.3 GB, ~20 s to write. One copy for every full-width test, deleted when the session ends:
  CI disks have had under 10 GB free. Skipped, saying why, where the disk cannot hold it.

`compute_path` runs a test once per compute path of libgptoss ('scalar', 'avx2', 'avx512'), skipping those
this machine cannot run, and restores the selected path afterwards.

Do not modify files under these fixtures: copy them to tmp_path first.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gptoss_stream.errors import DiskSpaceError  # noqa: E402
from gptoss_stream.weights.config import ModelConfig  # noqa: E402
from gptoss_stream.weights.synthetic import make_checkpoint  # noqa: E402

COMPUTE_PATHS = ["scalar", "avx2", "avx512"]
TINY_SEED = 0
TINY_HF_MAX_SHARD_BYTES = 30_000_000


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_checkpoint")
    make_checkpoint(root, ModelConfig.preset("tiny"), format="both", seed=TINY_SEED,
                    max_shard_bytes=TINY_HF_MAX_SHARD_BYTES, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_original(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint / "original"


@pytest.fixture(scope="session")
def tiny_hf(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint / "hf"


@pytest.fixture(scope="session")
def micro_config() -> ModelConfig:
    return ModelConfig.preset("tiny").with_overrides(
        num_hidden_layers=2, vocab_size=512, hidden_size=32, intermediate_size=32, num_experts=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory, micro_config: ModelConfig) -> Path:
    """Both layouts of micro_config (seed 1); the HF copy is split into shards of <= 20 KB."""
    root = tmp_path_factory.mktemp("micro_checkpoint")
    make_checkpoint(root, micro_config, format="both", seed=1, max_shard_bytes=20_000, progress=False)
    return root


@pytest.fixture(scope="session")
def full_width_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("full_width")
    config = ModelConfig.preset("20b").with_overrides(num_hidden_layers=2)
    try:
        make_checkpoint(root, config, format="hf", seed=7, progress=False)
    except DiskSpaceError as e:
        pytest.skip(f"full-width checkpoint: {e}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=COMPUTE_PATHS)
def compute_path(request: pytest.FixtureRequest):
    from gptoss_stream.engine import kernels

    available = COMPUTE_PATHS[: COMPUTE_PATHS.index(kernels.detect_isa()) + 1]
    if request.param not in available:
        pytest.skip(f"the {request.param} compute path cannot run on this machine")
    saved = kernels.get_isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(saved)
