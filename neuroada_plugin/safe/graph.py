"""What decides whether freezing the lowest adapters really frees activation memory.

Autograd records a layer's saved tensors only when something below it requires grad. Two
things keep the whole graph alive even when every adapter near the input is frozen:
``enable_input_require_grads`` (Transformers, PEFT and TRL add it with gradient checkpointing:
it makes the embedding output require grad) and reentrant checkpointing (which needs that
hook as long as any adapter inside a checkpointed block trains). This module detects the
checkpointing mode and, when it is safe, cuts the graph at the embedding output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EmbeddingCut", "reentrant_checkpointing"]


def reentrant_checkpointing(model: nn.Module) -> bool:
    """True when gradient checkpointing is on with ``use_reentrant=True`` (or unset, torch's old default)."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(function, "keywords", None) or {}
        if keywords.get("use_reentrant", True) is not False:
            return True
    return False


class EmbeddingCut:
    """A forward hook that detaches the input embedding's output, so autograd starts at the first trainable layer.

    Only installed when the embedding itself trains nothing (then no gradient upstream of its
    output is ever used) and checkpointing is not reentrant (reentrant checkpoints need an input
    that requires grad). Gradients of every trainable parameter are unchanged.
    """

    def __init__(self) -> None:
        self._handle: Any = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    @staticmethod
    def applicable(model: nn.Module) -> tuple[bool, str]:
        """Whether the cut can be installed, and if not, why (for the log line)."""
        try:
            embedding = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return False, "the model exposes no input embedding"
        if embedding is None:
            return False, "the model exposes no input embedding"
        if any(p.requires_grad for p in embedding.parameters()):
            return False, "the input embedding itself trains (modules_to_save or trainable tokens)"
        if reentrant_checkpointing(model):
            return False, (
                "gradient checkpointing is reentrant, which needs the embedding output to require grad; pass "
                "gradient_checkpointing_kwargs={'use_reentrant': False} to let memory drop"
            )
        return True, ""

    def install(self, model: nn.Module) -> None:
        if self.installed:
            return

        def detach_output(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                return output.detach()
            return None

        # Registered after any enable_input_require_grads hook, so it runs last and wins.
        self._handle = model.get_input_embeddings().register_forward_hook(detach_output)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
