"""What each registered method can be used with: one row per method, derived from its registry spec.

A user picks a method for its accuracy and must then learn whether it fits the run (sharding, a
quantized base, serving). This module answers that from the same spec flags that the Axolotl
validation and the tuners act on, so the table cannot promise what the code refuses:

* ``yes``: accepted, and a test in this repository exercises it (``tests/test_capability_table.py``
  names one test per cell and checks that it exists);
* ``no``: refused with a clear error when the configuration is read (the same test checks each);
* ``untested``: accepted by the flags, but no test exercises it yet; the method's spec lists it in
  ``untested`` so that the gap is stated, not hidden.

``neuroada-plugin methods --table`` prints :func:`markdown_table`; the README holds its output.
Import-light: no torch, PEFT or Transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .registry import MethodSpec

__all__ = ["CAPABILITIES", "Capability", "capability_legend", "capability_row", "markdown_table"]


def _always(spec: MethodSpec) -> bool:
    return True


def _zero3(spec: MethodSpec) -> bool:
    # ZeRO-3 partitions every weight: a method that reads the full weight (at creation or in every forward)
    # needs ``supports_sharding`` (gathering one layer at a time), as the Axolotl validation demands.
    return spec.supports_sharding or not (spec.reads_weights_when_created or spec.reads_weights_in_forward)


def _quantized(kind: str) -> Callable[[MethodSpec], bool]:
    def supported(spec: MethodSpec) -> bool:
        return not spec.needs_float_weights or kind in spec.quantized_layers

    return supported


def _streaming_merge(spec: MethodSpec) -> bool:
    return spec.checkpoint_rule is not None


def _vllm(spec: MethodSpec) -> bool:
    # Served as a plain merged checkpoint (no custom code in vLLM): needs a merge into the checkpoint.
    return spec.checkpoint_rule is not None and spec.exact_merge


@dataclass(frozen=True)
class Capability:
    """One column: its key (as in ``MethodSpec.untested``), its title, its rule over a spec and what it covers."""

    key: str
    title: str
    supported: Callable[[MethodSpec], bool]
    meaning: str


CAPABILITIES: tuple[Capability, ...] = (
    Capability("peft", "PEFT", _always, "get_peft_model / PeftModel.from_pretrained with no import"),
    Capability("trl_sft", "TRL SFT", _always, "SFTTrainer(peft_config=...)"),
    Capability("trl_dpo", "TRL DPO", _always, "DPOTrainer, reference = the adapter disabled"),
    Capability("trl_grpo", "TRL GRPO", _always, "GRPOTrainer"),
    Capability("axolotl", "Axolotl", _always, "`adapter: <method>` with the plugin"),
    Capability("ddp", "DDP", _always, "DistributedDataParallel"),
    Capability("fsdp", "FSDP", _always, "FSDP1 / FSDP2 on a full-precision base"),
    Capability("zero3", "ZeRO-3", _zero3, "DeepSpeed ZeRO-3 (weights partitioned when the adapter is created)"),
    Capability("bnb_4bit", "4-bit", _quantized("bnb_4bit"), "bitsandbytes load_in_4bit base"),
    Capability("bnb_8bit", "8-bit", _quantized("bnb_8bit"), "bitsandbytes load_in_8bit base"),
    # FSDP2 over a 4-bit base: accepted wherever 4-bit is (FSDP1 with a quantized base is refused for every method).
    Capability("fsdp_qlora", "FSDP-QLoRA", _quantized("bnb_4bit"), "FSDP2 over a 4-bit base (bnb_4bit_quant_storage)"),
    Capability("streaming_merge", "streaming merge", _streaming_merge, "`neuroada-plugin merge`, one tensor at a time"),
    Capability("exact_merge", "exact merge", lambda spec: spec.exact_merge, "merge/unmerge bit for bit"),
    Capability("lora_export", "LoRA export", lambda spec: spec.exports_lora, "an exactly equal standard LoRA adapter"),
    Capability("vllm", "vLLM", _vllm, "`vllm serve` of the merged checkpoint, no custom code"),
)


def capability_row(spec: MethodSpec) -> dict[str, str]:
    """``{capability key: "yes" | "no" | "untested"}`` for one method."""
    unknown = sorted(set(spec.untested) - {c.key for c in CAPABILITIES})
    if unknown:
        raise ValueError(
            f"MethodSpec {spec.name!r} lists unknown capabilities in `untested`: {unknown}; known: "
            f"{[c.key for c in CAPABILITIES]}."
        )
    row = {}
    for capability in CAPABILITIES:
        if not capability.supported(spec):
            row[capability.key] = "no"
        else:
            row[capability.key] = "untested" if capability.key in spec.untested else "yes"
    return row


def markdown_table(specs: Iterable[MethodSpec]) -> str:
    """The capability table as Markdown: one row per method, one column per capability."""
    header = ["method", *(c.title for c in CAPABILITIES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for spec in specs:
        row = capability_row(spec)
        lines.append("| " + " | ".join([spec.display_name, *(row[c.key] for c in CAPABILITIES)]) + " |")
    return "\n".join(lines) + "\n"


def capability_legend() -> str:
    """What each column of :func:`markdown_table` covers and what its cells mean (``methods --help`` prints it)."""
    width = max(len(c.title) for c in CAPABILITIES)
    lines = ["Columns of --table:", *(f"  {c.title:<{width}}  {c.meaning}" for c in CAPABILITIES)]
    lines += [
        "Cells: yes = accepted and exercised by a test of this repository; no = refused with an error when the",
        "configuration is read; untested = accepted, but no test exercises it yet.",
    ]
    return "\n".join(lines) + "\n"
