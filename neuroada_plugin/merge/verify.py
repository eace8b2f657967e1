"""``merge --verify`` and ``neuroada-plugin verify``: check a merged checkpoint against the adapter it came from.

The inputs are validated first, exactly as ``merge`` validates them (readable files, an adapter
that fits the base, a merged folder that is a checkpoint): bad input is an error that says what to
fix, never a traceback. Then two independent checks (this loads the whole model, unlike the merge):

1. Weights: the base is loaded **in the dtype the merged checkpoint is stored in** (a float16
   merge of a bfloat16 base is compared with the float16 merge, not with a float32 one), resized to
   the adapter's vocabulary when the adapter added tokens, the adapter attached with
   ``PeftModel.from_pretrained`` and merged in memory with ``merge_and_unload()``; every tensor of
   the checkpoint must equal it bit for bit. Differences are reported by kind: missing or extra
   tensors, other shapes, other dtypes, other values.
2. Logits: the unmerged adapter (``PeftModel`` in float32) and the merged checkpoint (loaded
   in float32) run the same input. For a float32 checkpoint they must agree to float32 rounding;
   for a bf16/fp16 one the merged weights are rounded to that dtype by design, so the difference
   is reported, not judged.

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

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import OVERRIDE_ENV
from .errors import CheckpointFileError
from .plan import plan_merge, tied_embeddings, vocabulary_resize
from .safetensors_io import DTYPES
from .sources import load_adapter, scan_base_checkpoint

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


def _load(folder: Path, dtype: torch.dtype | str, what: str, vocab_size: int | None = None):
    """The model in ``folder`` (resized to ``vocab_size`` rows); a load failure is bad input, named as such."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    except Exception as error:
        raise CheckpointFileError(
            f"{what} {folder} cannot be loaded with Transformers ({type(error).__name__}: {_first_line(error)})."
        ) from error
    if vocab_size is not None and model.get_input_embeddings().weight.shape[0] != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # the adapter's saved embeddings fill it
    return model


def _with_adapter(model, adapter: Path, allow_base_mismatch: bool):
    from peft import PeftModel

    saved = os.environ.get(OVERRIDE_ENV)
    if allow_base_mismatch:
        os.environ[OVERRIDE_ENV] = "1"  # what the layers read while PEFT loads the file
    try:
        return PeftModel.from_pretrained(model, adapter, low_cpu_mem_usage=True).eval()
    except AdapterCheckpointError:
        raise  # named already (e.g. the base fingerprint does not match)
    except Exception as error:
        raise CheckpointFileError(
            f"Adapter {adapter} cannot be attached to the base with PEFT ({type(error).__name__}: "
            f"{_first_line(error)})."
        ) from error
    finally:
        if allow_base_mismatch:
            if saved is None:
                os.environ.pop(OVERRIDE_ENV, None)
            else:
                os.environ[OVERRIDE_ENV] = saved


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def verify_merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    merged: str | os.PathLike,
    *,
    allow_base_mismatch: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Validate the inputs, run both checks; return a summary dict, raise :class:`VerificationError` on a mismatch.

    Bad input raises what ``merge`` raises for it (:class:`CheckpointFileError`,
    :class:`~neuroada_plugin.errors.AdapterCheckpointError`, ...).
    """
    from safetensors import safe_open

    from ..peft_registration import register_all

    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    base_ckpt = scan_base_checkpoint(base)
    adapter_ckpt = load_adapter(adapter)
    plan = plan_merge(adapter_ckpt, base_ckpt)  # the adapter fits this base (shapes, indices, files)
    merged_ckpt = scan_base_checkpoint(merged, "Merged checkpoint")
    vocab_size = vocabulary_resize(plan)
    main = merged_ckpt.main_dtype()  # the safetensors dtype holding most of its floating-point bytes
    dtype = DTYPES[main][1] if main in DTYPES else torch.float32
    register_all()  # the adapter's method must be a PEFT method (normally done already by the start-up hook)

    log(f"[verify] in-memory merge_and_unload in {_name(dtype)} (the merged checkpoint's dtype), bit-exact comparison")
    reference = _with_adapter(_load(base, dtype, "Base model", vocab_size), adapter, allow_base_mismatch)
    reference = reference.merge_and_unload()
    expected = {name: value.detach() for name, value in reference.state_dict().items()}
    vocab = reference.get_input_embeddings().weight.shape[0]
    del reference
    problems: dict[str, list[str]] = {"value": [], "dtype": [], "shape": [], "extra": []}
    seen = set()
    for shard in merged_ckpt.shards:
        with safe_open(shard.path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                seen.add(name)
                want = expected.get(name)
                if want is None:
                    problems["extra"].append(name)
                    continue
                got = handle.get_tensor(name)
                if got.shape != want.shape:
                    problems["shape"].append(f"{name} {list(got.shape)} vs {list(want.shape)}")
                elif got.dtype != want.dtype:
                    problems["dtype"].append(f"{name} {_name(got.dtype)} vs {_name(want.dtype)}")
                elif not torch.equal(got, want):
                    problems["value"].append(name)
    # A tied output embedding is stored once, as its input embedding: it must equal that one.
    tied = tied_embeddings(merged_ckpt)
    missing = [
        name
        for name in expected
        if name not in seen
        and not (
            tied.get(name) in seen and tied[name] in expected and torch.equal(expected[name], expected[tied[name]])
        )
    ]
    compared = len(seen) - len(problems["extra"])
    del expected
    gc.collect()
    if any(problems.values()) or missing or compared == 0:
        raise VerificationError(_mismatch_message(merged, dtype, compared, problems, missing))

    log("[verify] logits of the unmerged adapter vs the merged checkpoint (float32)")
    ids = _input_ids(merged, vocab)
    with torch.no_grad():
        adapted = _with_adapter(_load(base, torch.float32, "Base model", vocab_size), adapter, allow_base_mismatch)
        want_logits = adapted(input_ids=ids).logits
        del adapted
        gc.collect()
        merged_model = _load(merged, torch.float32, "Merged checkpoint")
        got_logits = merged_model(input_ids=ids).logits
        del merged_model
    max_diff = float((got_logits - want_logits).abs().max())
    scale = max(1.0, float(want_logits.abs().max()))
    argmax_agree = float((got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean())
    summary = (
        f"weights bit-identical to merge_and_unload in {_name(dtype)} ({compared} tensors); logits max |diff| "
        f"{max_diff:.3g} (scale {scale:.3g}), argmax agreement {argmax_agree:.3f} over {ids.shape[1]} positions"
    )
    if dtype == torch.float32 and max_diff > 1e-4 * scale:
        raise VerificationError(f"float32 merged logits differ from the adapter's by {max_diff:.3g}: {summary}")
    log(f"[verify] ok: {summary}")
    return {
        "tensors_compared": compared,
        "dtype": _name(dtype),
        "vocab_size": vocab,
        "max_abs_logit_diff": max_diff,
        "argmax_agreement": argmax_agree,
        "summary": summary,
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mismatch_message(
    merged: Path, dtype: torch.dtype, compared: int, problems: dict[str, list[str]], missing: list[str]
) -> str:
    if compared == 0 and not any(problems.values()):
        return f"merged checkpoint {merged} holds none of the model's tensors."

    def listed(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = []
    if problems["value"]:
        parts.append(
            f"{len(problems['value'])} of {compared} tensors have other values than PEFT's in-memory merge in "
            f"{_name(dtype)}: {listed(problems['value'])}"
        )
    if problems["dtype"]:
        parts.append(
            f"{len(problems['dtype'])} tensors are stored in another dtype than the rest of the checkpoint "
            f"(merged vs reference): {listed(problems['dtype'])}"
        )
    if problems["shape"]:
        parts.append(
            f"{len(problems['shape'])} tensors have other shapes (merged vs reference): {listed(problems['shape'])}"
        )
    if missing:
        parts.append(f"{len(missing)} tensors of the model are missing: {listed(missing)}")
    if problems["extra"]:
        parts.append(f"{len(problems['extra'])} tensors are not part of the model: {listed(problems['extra'])}")
    return f"merged checkpoint {merged} differs from the merge of this base and adapter: " + "; ".join(parts) + "."
