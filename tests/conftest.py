from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never reach a hub; converted offline models are cached inside the checkout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NEUROADA_CACHE", str(ROOT / ".cache"))
# tests/: the test helper modules (tiny_models, bnb_layouts, ...). The shared harness is the top-level `harness`.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import neuroada_plugin  # noqa: E402,F401  (registers NEUROADA with PEFT)

if os.environ.get("NEUROADA_TEST_NO_BNB_CPU_PACKING") == "1":
    # Run this process as on a CPU without AVX512-BF16: bitsandbytes never packs a 4-bit weight for its
    # CPU kernel (tests/bnb_layouts.py). Subprocesses started by tests are not affected.
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="Device for the tests that take the `device` fixture (the ops' own tests, e.g. tests/test_smoa.py): "
        "cpu (default) or cuda, to check the CUDA paths of the same ops against the same references.",
    )


def pytest_configure(config: pytest.Config) -> None:
    import torch

    chosen = torch.device(config.getoption("--device"))
    if chosen.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {chosen}: the op tests run on cpu or cuda (cuda:N).")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was given, but torch sees no CUDA device on this machine.")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest):
    """The ``--device`` the op tests run on (checked in pytest_configure: a missing GPU is an error, not a skip)."""
    import torch

    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from harness.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (random weights, real SmolLM2 tokenizer); shared, treat as read-only."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
