"""The PEFT config base every method of this package derives from, and the default target modules.

Every method's config shares the targeting fields (which modules, which layers, what else to
save) and does the same things after PEFT's own ``__post_init__``: make sure the method is
registered with PEFT (whatever was imported first), check its fields, and turn target lists into
sets as PEFT's configs do. :class:`MethodConfig` holds all of it; a method sets ``method_name``,
declares its own fields and writes ``_validate`` for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """``PeftConfig`` of a registered method: the fields every method shares, registration with PEFT, validation.

    A method's config sets ``method_name``, declares its own fields and writes ``_validate`` for them;
    the targeting fields below (help text, checks, list -> set) are the same for every method. A
    method may redeclare one of them to say what it means for that method (``init_weights``).
    """

    method_name: ClassVar[str] = ""  # the registry name ("neuroada", "neat")

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or regex to adapt; None: attention+MLP projections; 'all-linear' accepted."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList of layers, used with layers_to_transform."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start as the base model (True) or from random adapter values (False)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    base_quantization: list[dict] | None = field(
        default=None,
        metadata={
            "help": "Recorded by the plugin, not set by hand: for a method whose update is a function of the frozen "
            "weight, the bitsandbytes settings of the layers it was created on (groups of {'settings', 'modules'}), "
            "so that a merge into the full-precision original can reproduce the weight the adapter learned against.",
            "recorded": True,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from .peft_registration import ensure_registered

        # Creating a config always leaves the method registered with PEFT, whatever was imported first.
        self.peft_type = ensure_registered(self.method_name)
        self._validate_targets()
        self._validate()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name, None), list):
                setattr(self, name, set(getattr(self, name)))

    def _validate_targets(self) -> None:
        """The checks of the shared fields, named with the method's config class."""
        name = type(self).__name__
        if isinstance(self.target_modules, str) and self.target_modules.strip() == "":
            raise ValueError(f"{name}.target_modules is an empty string; use None for the default targets.")
        if isinstance(self.target_modules, (list, set)) and not self.target_modules:
            raise ValueError(f"{name}.target_modules is empty: nothing would be adapted.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}.layers_pattern only makes sense together with layers_to_transform.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules string.")
        if self.modules_to_save is not None and isinstance(self.modules_to_save, str):
            raise ValueError(f"{name}.modules_to_save must be a list of module names, not a string.")

    def _validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed (the method's own checks)."""
