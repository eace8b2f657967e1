"""Tiny models for fast tests: random Llama weights with the real SmolLM2 tokenizer.

The builders live in :mod:`harness.models` (shared with the Axolotl CI preparation and the
benchmarks' ``--quick`` runs).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from harness.models import save_tiny_llama, tiny_llama_config

__all__ = ["save_tiny_llama", "tiny_llama", "tiny_llama_config"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (deterministic for a given seed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model
