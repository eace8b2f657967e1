"""Tiny models for fast tests: random Llama weights with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from neuroada_plugin.offline_models import smollm2_checkpoint


def tiny_llama_config(vocab_size: int = 49152, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (deterministic for a given seed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny Llama plus the real SmolLM2 tokenizer (with chat template) to ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), **overrides)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
