"""Planning: which base tensors change and how, validated against the base before anything is written.

:func:`plan_merge` finds the adapter's method in the registry, groups the adapter's tensors by
module (``<module>.<prefix><param>`` and ``<module>.<prefix><param>.<adapter name>``), refuses a
file holding several adapters, asks the method's rule for each module's patches, adds the full
copies PEFT saves (``modules_to_save``, ``base_layer`` weights, embedding layers saved whole, also
with a resized vocabulary), redirects patches of a tied output embedding the checkpoint does not
store, runs every patch's check, and fails on any adapter tensor nobody explained.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import TOLERANCE, check_fingerprint, is_recorded
from ..registry import MethodSpec
from .rules import FINGERPRINT_PARAM, AdapterModule, TensorPatch, get_checkpoint_rule, method_for_adapter
from .sources import ADAPTER_CONFIG, AdapterCheckpoint, BaseCheckpoint

__all__ = [
    "FingerprintChecks",
    "group_by_module",
    "plan_merge",
    "split_fingerprint",
    "tied_embeddings",
    "vocabulary_resize",
]

_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
_INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)


def group_by_module(adapter: AdapterCheckpoint, prefix: str) -> dict[str, AdapterModule]:
    """The adapter's tensors of the method with PEFT prefix ``prefix``, grouped by module.

    Accepts ``<module>.<prefix><param>`` (as PEFT saves) and ``<module>.<prefix><param>.<adapter>``
    (a raw ``PeftModel.state_dict()``); refuses a file that holds more than one adapter. Keys
    without the prefix are left out (full copies, or reported as unexplained by the planner).
    """
    pattern = re.compile(rf"(?P<module>.+)\.{re.escape(prefix)}(?P<param>\w+?)(?:\.(?P<adapter>[^.]+))?")
    grouped: dict[str, dict[str, str]] = {}
    adapter_names: dict[str | None, str] = {}
    for key in adapter.tensors:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        adapter_names.setdefault(match["adapter"], key)
        params = grouped.setdefault(match["module"], {})
        if match["param"] in params:
            raise AdapterCheckpointError(
                f"{adapter.weights_file}: layer {match['module']} has two '{prefix}{match['param']}' entries "
                f"({params[match['param']]!r} and {key!r}): the file holds several adapters; save one adapter at a time."
            )
        params[match["param"]] = key
    if len(adapter_names) > 1:
        shown = ", ".join(repr(key) for key in list(adapter_names.values())[:3])
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: the file holds several adapters (keys such as {shown} name different adapters); "
            "save one adapter at a time (PeftModel.save_pretrained writes one folder per adapter)."
        )
    return {
        module: AdapterModule(
            module=module,
            tensors={param: adapter.tensors[key] for param, key in params.items()},
            keys=dict(params),
            config=adapter.config,
            weights_file=adapter.weights_file,
        )
        for module, params in sorted(grouped.items())
    }


@dataclass
class FingerprintChecks:
    """The base-fingerprint comparisons of one merge (kit/fingerprint.py), run as the base weights are read.

    Each is a patch that computes the fingerprint of the tensor it receives (before any change) and
    raises :class:`~neuroada_plugin.kit.fingerprint.BaseMismatchError` unless ``allow``.
    """

    allow: bool = False
    patches: list[TensorPatch] = field(default_factory=list)
    distances: dict[str, float] = field(default_factory=dict)
    not_recorded: list[str] = field(default_factory=list)

    def add(self, module: AdapterModule, target: str, recorded: torch.Tensor, key: str) -> TensorPatch:
        def apply(weight: torch.Tensor) -> torch.Tensor:
            distance = check_fingerprint(
                recorded, weight, where=f"{module.where}", allow=self.allow, override="pass --allow-base-mismatch"
            )
            if distance is not None:
                self.distances[module.module] = distance
            return weight

        patch = TensorPatch(target=target, apply=apply, sources=(key,), description="base fingerprint check")
        self.patches.append(patch)
        return patch

    def summary(self) -> dict[str, object]:
        """What ``merge_info.json`` records."""
        worst = max(self.distances.values(), default=None)
        return {
            "layers_checked": len(self.distances),
            "max_distance": None if worst is None else round(worst, 4),
            "tolerance": TOLERANCE,
            "layers_without_fingerprint": len(self.not_recorded),
            "mismatch_allowed": self.allow,
        }


def split_fingerprint(module: AdapterModule) -> tuple[AdapterModule, torch.Tensor | None, str | None]:
    """``module`` without its base fingerprint, the fingerprint and its key (``None`` when the file has none)."""
    if FINGERPRINT_PARAM not in module.tensors:
        return module, None, None
    recorded = module.tensors[FINGERPRINT_PARAM]
    rest = dataclasses.replace(
        module,
        tensors={k: v for k, v in module.tensors.items() if k != FINGERPRINT_PARAM},
        keys={k: v for k, v in module.keys.items() if k != FINGERPRINT_PARAM},
        fingerprint=recorded if is_recorded(recorded) else None,
    )
    return rest, module.tensors[FINGERPRINT_PARAM], module.keys[FINGERPRINT_PARAM]


def plan_merge(
    adapter: AdapterCheckpoint, base: BaseCheckpoint, checks: FingerprintChecks | None = None
) -> dict[str, list[TensorPatch]]:
    """Validate ``adapter`` against ``base`` and return base tensor name -> patches (in order).

    Recorded base fingerprints become checks (``checks``, a new one when ``None``) placed before the
    patches of each adapted weight, so they see the base value.
    """
    checks = checks if checks is not None else FingerprintChecks()
    if not adapter.peft_type:
        raise AdapterCheckpointError(f"{adapter.path / ADAPTER_CONFIG}: no 'peft_type'.")
    spec = method_for_adapter(adapter.peft_type)
    rule = get_checkpoint_rule(adapter.peft_type)
    modules = group_by_module(adapter, spec.prefix)
    if not modules:
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: adapter_config.json says {spec.peft_type}, but the file has no "
            f"'*.{spec.prefix}*' tensors."
        )
    method_patches = []
    check_patches = []
    for module in modules.values():
        module, recorded, key = split_fingerprint(module)  # the engine's, not the rule's
        module = dataclasses.replace(module, base_mismatch_allowed=checks.allow)
        target = f"{module.module}.weight"
        if not is_recorded(recorded):  # no key (saved before fingerprints existed) or the placeholder
            checks.not_recorded.append(module.module)
        elif target in base.tensors:
            check_patches.append(checks.add(module, target, recorded, key))
        for patch in rule(module, base.tensors):
            if not patch.sources:
                patch = dataclasses.replace(patch, sources=tuple(module.keys.values()))
            method_patches.append(patch)
    used = {key for module in modules.values() for key in module.keys.values()}  # fingerprints included
    # Full copies come first: PEFT saves the base weight of an adapted embedding-like layer
    # (e.g. a tied lm_head) as "<module>.base_layer.weight", and loading restores it before
    # the adapter acts; modules_to_save replace a whole module.
    full_copies = _full_copy_patches(adapter, base, used)
    patches = check_patches + full_copies + method_patches
    used |= {key for patch in patches for key in patch.sources}
    _refuse_unused(adapter, spec, sorted(set(adapter.tensors) - used))

    plan: dict[str, list[TensorPatch]] = {}
    tied = tied_embeddings(base)
    for patch in patches:
        targets = [patch.target]
        if patch.target in tied:
            partner = tied[patch.target]
            targets = [t for t in (patch.target, partner) if t in base.tensors]
        if not any(t in base.tensors for t in targets):
            raise AdapterCheckpointError(
                f"Adapter and base model do not match: adapter tensor(s) {', '.join(patch.sources)} apply to base "
                f"tensor {patch.target!r}, which base checkpoint {base.folder} does not contain. The adapter was "
                "trained on a different base model (or the base checkpoint is incomplete)."
            )
        for target in targets:
            patch.check(base.tensors[target])
            plan.setdefault(target, []).append(patch)
    _check_full_copies(adapter, base, plan, full_copies)
    return plan


def _refuse_unused(adapter: AdapterCheckpoint, spec: MethodSpec, unused: list[str]) -> None:
    if not unused:
        return
    shown = ", ".join(unused[:5]) + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
    extra = (
        " Trainable-token / resized-embedding adapters are not supported by the streaming merge; use "
        "PeftModel.merge_and_unload() for those."
        if any("token_adapter" in k or "trainable_tokens" in k for k in unused)
        else ""
    )
    raise AdapterCheckpointError(
        f"{adapter.weights_file}: {len(unused)} tensor(s) do not correspond to anything the {spec.name} merge rule "
        f"or modules_to_save understands: {shown}.{extra}"
    )


def _full_copy(value) -> Callable:
    return lambda old: value.to(old.dtype).clone()


def _is_embedding(name: str) -> bool:
    """An input or output embedding (rows = the vocabulary), by the names Transformers models use."""
    return name.endswith(_INPUT_EMBEDDING_SUFFIXES) or any(
        name == output or name.endswith(f".{output}") for output in _OUTPUT_EMBEDDINGS
    )


def _full_copy_patches(adapter: AdapterCheckpoint, base: BaseCheckpoint, used: set[str]) -> list[TensorPatch]:
    """Patches that overwrite a whole base tensor: ``modules_to_save`` entries, saved ``base_layer`` weights and
    embedding layers saved whole (PEFT's ``save_embedding_layers``, e.g. after new tokens were added).

    An embedding may have more or fewer rows than the base's (a resized vocabulary); any other shape
    difference means the adapter belongs to another model.
    """
    modules = adapter.config.get("modules_to_save") or []
    tied = tied_embeddings(base)
    patches = []
    for key, value in adapter.tensors.items():
        if key in used:
            continue
        match = re.fullmatch(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)", key)
        module = key.rsplit(".", 1)[0]
        if match:
            target, why = f"{match['module']}.{match['param']}", "saved base_layer weight (full copy)"
        elif any(module == m or module.endswith(f".{m}") for m in modules):
            target, why = key, "modules_to_save (full copy)"
        elif _is_embedding(key):
            target, why = key, "saved embedding layer (full copy)"
        else:
            continue
        if target not in base.tensors and tied.get(target) not in base.tensors:
            continue  # left unused: reported with the other unexplained keys
        info = base.tensors.get(target) or base.tensors[tied[target]]
        shape = tuple(value.shape)
        resized = (
            shape != info.shape
            and _is_embedding(target)
            and len(shape) == len(info.shape) == 2
            and shape[1] == info.shape[1]
        )
        if shape != info.shape and not resized:
            raise AdapterCheckpointError(
                f"Adapter and base model do not match: adapter tensor {key!r} ({why}) has shape {list(value.shape)}, "
                f"base tensor {info.name!r} in {info.file.name} has shape {list(info.shape)}."
            )
        patches.append(
            TensorPatch(
                target=target,
                apply=_full_copy(value),
                sources=(key,),
                description=why + (f", vocabulary {info.shape[0]} -> {shape[0]}" if resized else ""),
                shape=shape if resized else None,
            )
        )
    return patches


def _check_full_copies(
    adapter: AdapterCheckpoint, base: BaseCheckpoint, plan: dict[str, list[TensorPatch]], full_copies: list[TensorPatch]
) -> None:
    """A resized vocabulary must be resized everywhere, and tied tensors must receive one value.

    Refused: two different full copies for one stored tensor (an adapter that trained its input and
    output embeddings apart, on a base that ties them), embeddings resized to different sizes, and an
    embedding left at the old vocabulary size while another was resized.
    """
    for target, patches in plan.items():
        copies = [p for p in patches if any(p is copy for copy in full_copies)]
        for other in copies[1:]:
            first, second = adapter.tensors[copies[0].sources[0]], adapter.tensors[other.sources[0]]
            if first.shape != second.shape or not torch.equal(first, second):
                raise AdapterCheckpointError(
                    f"{adapter.weights_file}: {copies[0].sources[0]!r} and {other.sources[0]!r} hold different values, "
                    f"but the base model ties them (tie_word_embeddings: both are {target!r}). Merge with PEFT "
                    "(PeftModel.from_pretrained(...).merge_and_unload()) after untying the base, or save the adapter "
                    "from a model whose embeddings stay tied."
                )
    resized = {target: patch.shape for target, patches in plan.items() for patch in patches if patch.shape}
    if not resized:
        return
    rows = {shape[0] for shape in resized.values()}
    if len(rows) > 1:
        shown = ", ".join(f"{name} -> {shape[0]}" for name, shape in sorted(resized.items()))
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: the adapter resizes the vocabulary inconsistently ({shown}); the embeddings of "
            "one model share one vocabulary size."
        )
    old_rows = {base.tensors[target].shape[0] for target in resized}
    left = sorted(
        name
        for name, info in base.tensors.items()
        if name not in resized and _is_embedding(name) and len(info.shape) == 2 and info.shape[0] in old_rows
    )
    if left:
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: the adapter resizes {', '.join(sorted(resized))} to {rows.pop()} rows (new "
            f"tokens) but has no new value for {', '.join(left)} of the base, which would keep the old vocabulary size. "
            "Save the adapter with both embedding layers (PEFT: save_pretrained(..., save_embedding_layers=True))."
        )


def vocabulary_resize(plan: dict[str, list[TensorPatch]]) -> int | None:
    """The merged model's vocabulary size when the plan resizes the embeddings, else ``None``."""
    rows = {patch.shape[0] for patches in plan.values() for patch in patches if patch.shape}
    return rows.pop() if rows else None


def tied_embeddings(base: BaseCheckpoint) -> dict[str, str]:
    """Output embedding <-> input embedding names when the config ties them, else empty."""
    config = base.config
    tie = config.get("tie_word_embeddings")
    if tie is None and isinstance(config.get("text_config"), dict):
        tie = config["text_config"].get("tie_word_embeddings")
    if not tie:
        return {}
    inputs = [n for n in base.tensors if n.endswith(_INPUT_EMBEDDING_SUFFIXES)]
    if len(inputs) != 1:
        return {}
    mapping = {}
    for output in _OUTPUT_EMBEDDINGS:
        mapping[output] = inputs[0]
        mapping.setdefault(inputs[0], output)
    return mapping
