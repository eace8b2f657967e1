"""Tiny models for fast tests: random Llama weights with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from neuroada_plugin import offline_models
from neuroada_plugin.offline_models import tiny_llama_config


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (deterministic for a given seed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny Llama plus the real SmolLM2 tokenizer (with chat template) to ``path``."""
    return offline_models.save_tiny_llama(path, seed=seed, **overrides)
