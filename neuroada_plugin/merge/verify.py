"""``merge --verify`` and ``neuroada-plugin verify``: check a merged checkpoint against the adapter it came from.

Two independent checks (this loads the whole model, unlike the merge itself):

1. Weights: the base is loaded in its own dtype, the adapter attached with
   ``PeftModel.from_pretrained`` and merged in memory with ``merge_and_unload()``; every tensor
   of the written checkpoint must equal it bit for bit. This is exact in any dtype.
2. Logits: the unmerged adapter (``PeftModel`` in float32) and the merged checkpoint (loaded
   in float32) run the same input. For a float32 base they must agree to float32 rounding;
   for a bf16/fp16 base the merged weights are rounded to that dtype by design, so the
   difference is reported, not judged.

Adapters are loaded with ``low_cpu_mem_usage=True``: the connection indices come from the file
either way, and this skips re-running the top-k selection on every adapted weight (about 30x
faster to load for SmolLM2 with top_k=20).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["VerificationError", "verify_merge"]

_PROMPT = "The quick brown fox jumps over the lazy dog. Question: what is two plus two? Answer:"


class VerificationError(AssertionError):
    """The merged checkpoint does not reproduce the adapter."""


def _input_ids(folder: Path, vocab_size: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(folder)(_PROMPT, return_tensors="pt")["input_ids"]
        if int(ids.max()) < vocab_size:
            return ids
    except Exception:  # no tokenizer in the folder: fixed ids are as good for a comparison
        pass
    return (torch.arange(24) * 7919 % vocab_size).unsqueeze(0)


def _load(folder: Path, dtype: torch.dtype | str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def verify_merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    merged: str | os.PathLike,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run both checks; return a summary dict, raise :class:`VerificationError` on a mismatch."""
    from peft import PeftModel
    from safetensors import safe_open

    from ..peft_registration import register_all

    register_all()  # the adapter's method must be a PEFT method (normally done already by the start-up hook)

    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    log("[verify] in-memory merge_and_unload for a bit-exact weight comparison")
    reference = PeftModel.from_pretrained(_load(base, "auto"), adapter, low_cpu_mem_usage=True).merge_and_unload()
    expected = reference.state_dict()
    compared, mismatched = 0, []
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                if name not in expected:
                    continue
                compared += 1
                got, want = handle.get_tensor(name), expected[name]
                if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                    mismatched.append(name)
    vocab_size = reference.config.vocab_size
    del reference, expected
    gc.collect()
    if mismatched or compared == 0:
        raise VerificationError(
            f"merged checkpoint differs from PEFT's in-memory merge in {len(mismatched)} of {compared} tensors: "
            f"{mismatched[:5]}"
        )

    log("[verify] logits of the unmerged adapter vs the merged checkpoint (float32)")
    ids = _input_ids(merged, vocab_size)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(_load(base, torch.float32), adapter, low_cpu_mem_usage=True).eval()
        want_logits = adapted(input_ids=ids).logits
        del adapted
        gc.collect()
        merged_model = _load(merged, torch.float32)
        got_logits = merged_model(input_ids=ids).logits
        del merged_model
    max_diff = float((got_logits - want_logits).abs().max())
    scale = max(1.0, float(want_logits.abs().max()))
    argmax_agree = float((got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean())
    stored_dtype = _stored_dtype(merged)
    summary = (
        f"weights bit-identical to merge_and_unload ({compared} tensors); logits max |diff| {max_diff:.3g} "
        f"(scale {scale:.3g}), argmax agreement {argmax_agree:.3f} over {ids.shape[1]} positions"
    )
    if stored_dtype == torch.float32 and max_diff > 1e-4 * scale:
        raise VerificationError(f"float32 merged logits differ from the adapter's by {max_diff:.3g}: {summary}")
    log(f"[verify] ok: {summary}")
    return {
        "tensors_compared": compared,
        "max_abs_logit_diff": max_diff,
        "argmax_agreement": argmax_agree,
        "summary": summary,
    }


def _stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype most of the checkpoint's bytes are stored in."""
    from .safetensors_io import read_header

    sizes: dict[torch.dtype, int] = {}
    for shard in folder.glob("*.safetensors"):
        for entry in read_header(shard).tensors:
            if entry.torch_dtype is not None and entry.torch_dtype.is_floating_point:
                sizes[entry.torch_dtype] = sizes.get(entry.torch_dtype, 0) + entry.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32
