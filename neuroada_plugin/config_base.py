"""The PEFT config base every method of this package derives from, and the default target modules.

Each method's config does the same three things after PEFT's own ``__post_init__``: make sure the
method is registered with PEFT (whatever was imported first), check its own fields, and turn
target lists into sets as PEFT's configs do. :class:`MethodConfig` does them once; a method sets
``method_name`` and writes ``_validate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft.config import PeftConfig

__all__ = ["DEFAULT_TARGET_MODULES", "MethodConfig"]

# Attention and MLP projections of the decoder architectures the paper and TRL users meet;
# used when ``target_modules`` is left at None. Embeddings and lm_head are never defaults.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        model_type: _LLAMA_LIKE
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "deepseek_v2",
            "deepseek_v3",
            "smollm3",
            "stablelm",
        )
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
}


@dataclass
class MethodConfig(PeftConfig):
    """``PeftConfig`` of a registered method: registers it with PEFT, validates, normalises the target lists."""

    method_name: ClassVar[str] = ""  # the registry name ("neuroada", "neat")

    def __post_init__(self) -> None:
        super().__post_init__()
        from .peft_registration import ensure_registered

        # Creating a config always leaves the method registered with PEFT, whatever was imported first.
        self.peft_type = ensure_registered(self.method_name)
        self._validate()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name, None), list):
                setattr(self, name, set(getattr(self, name)))

    def _validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed (the method's own checks)."""
