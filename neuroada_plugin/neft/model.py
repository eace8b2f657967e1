"""NeFT tuner: chooses the neurons over all targeted layers under one global budget, then wraps those layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config_base import DEFAULT_TARGET_MODULES
from ..kit.layer import layer_shape
from ..kit.tuner import MethodTuner
from .config import NeftConfig
from .functional import Candidate, global_selection, magnitude_scores, random_scores, resolve_budget
from .layer import NeftLayer
from .selection_file import SelectionFileError, read_selection

# The paper's candidates: up_proj rows and down_proj columns, for every architecture that has both.
_PAPER_TARGETS = {
    model_type: ["up_proj", "down_proj"]
    for model_type, names in DEFAULT_TARGET_MODULES.items()
    if "up_proj" in names and "down_proj" in names
}

# (axis, indices), or (axis, count) for an adapter being loaded from a file.
Plan = dict[str, tuple[str, "torch.Tensor | int"]]


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def candidates_of(
    config: NeftConfig, model: nn.Module, targeted: Callable[[str], bool]
) -> dict[str, tuple[Candidate, nn.Module]]:
    """Every targeted layer as a selection candidate (its axis from ``column_modules``), with its base layer."""
    columns = tuple(config.column_modules or ())
    found = {}
    for key, module in model.named_modules():
        if not targeted(key):
            continue
        axis = "cols" if any(key == c or key.endswith(f".{c}") for c in columns) else "rows"
        base = _base(module)
        found[key] = (Candidate(key, axis, layer_shape(base)), base)
    return found


def plan_neurons(config: NeftConfig, model: nn.Module, targeted: Callable[[str], bool]) -> Plan:
    """The neurons of every targeted layer (``targeted(name)``) under ``config``'s global selection."""
    found = candidates_of(config, model, targeted)
    if config.neurons_per_module is not None:  # a saved adapter: its file brings the indices
        plan: Plan = {}
        for key, (axis, count) in config.neurons_per_module.items():
            if key not in found:
                raise ValueError(
                    f"NeFT adapter config lists layer {key}, which this model does not have (or target_modules "
                    "excludes): the adapter was made for another model."
                )
            plan[key] = (axis, int(count))
        return plan
    candidates = [candidate for candidate, _ in found.values()]
    if config.selection == "file":
        return _plan_from_file(config, found)
    if config.selection == "magnitude":
        scores = {c.module: magnitude_scores(base.weight, c.axis) for c, base in found.values()}
    else:
        scores = {c.module: random_scores(c.count, config.seed, c.module) for c in candidates}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    neurons, parameters = resolve_budget(
        candidates, num_neurons=config.num_neurons, neuron_share=config.neuron_share, total_parameters=total
    )
    chosen = global_selection(candidates, scores, neurons=neurons, parameters=parameters)
    return {c.module: (c.axis, chosen[c.module]) for c in candidates}


def _plan_from_file(config: NeftConfig, found: dict[str, tuple[Candidate, nn.Module]]) -> Plan:
    if not config.selection_file:
        raise ValueError(
            "NeftConfig(selection='file') needs selection_file: the neurons of the paper's rule come from a short "
            "fine-tuning on your data. Make the file with `neuroada-plugin neft-select --model <model> --data "
            "<train.jsonl> --output neurons.json` and pass NeftConfig(selection_file='neurons.json'); or use a "
            "data-free ablation: NeftConfig(selection='magnitude', neuron_share=0.004)."
        )
    selection = read_selection(config.selection_file)
    missing = sorted(set(found) - set(selection.modules))
    extra = sorted(set(selection.modules) - set(found))
    if missing or extra:
        raise SelectionFileError(
            f"NeFT selection file {selection.path} does not match the targeted layers: "
            + (f"no entry for {missing[:3]}{' ...' if len(missing) > 3 else ''}; " if missing else "")
            + (f"entries for untargeted {extra[:3]}{' ...' if len(extra) > 3 else ''}; " if extra else "")
            + "a selection file covers exactly the candidate layers it was made for (one global budget), so set "
            "target_modules / column_modules as neft-select had them and leave layers_to_transform / "
            "exclude_modules unset, or make a new file with neft-select --target-modules."
        )
    plan: Plan = {}
    for key, (candidate, base) in found.items():
        entry = selection.modules[key]
        if entry.axis != candidate.axis:
            raise SelectionFileError(
                f"NeFT selection file {selection.path}: layer {key} was selected by {entry.axis}, but column_modules "
                f"makes it a {candidate.axis} layer here. Use the column_modules the file was made with."
            )
        selection.check_weight(key, base.weight)
        plan[key] = (candidate.axis, entry.neurons)
    return plan


class NeftModel(MethodTuner):
    """PEFT tuner for NeFT. Create it through ``peft.get_peft_model(model, NeftConfig(selection_file=...))``."""

    method_name = "neft"
    tuner_layer_cls = NeftLayer
    target_module_mapping = _PAPER_TARGETS

    def _prepare_model(self, peft_config: NeftConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)  # every target checked against the spec's flags first
        self._neft_plan = self._plan(peft_config, model)

    def _plan(self, config: NeftConfig, model: nn.Module) -> Plan:
        return plan_neurons(
            config, model, lambda key: self.prefix not in key and self._check_target_module_exists(config, key)
        )

    def _create_and_replace(
        self, config: NeftConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str, **optional_kwargs: Any,
    ) -> None:  # fmt: skip
        entry = self._neft_plan.get(current_key)
        if entry is None or (not isinstance(entry[1], int) and entry[1].numel() == 0):
            return  # no neuron of this layer was selected: it stays as it is
        if isinstance(target, NeftLayer):
            target.add_neurons(adapter_name, config, *entry, module_name=current_key)
            return
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **optional_kwargs)

    def create_layer(self, target: nn.Module, adapter_name: str, config: NeftConfig, module_name: str) -> NeftLayer:
        axis, index = self._neft_plan[module_name]
        return NeftLayer(target, adapter_name, config, axis, index, module_name=module_name)

    def _post_injection_hook(self, model: nn.Module, config: NeftConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        if config.neurons_per_module is None:  # saved with the adapter: loading needs no selection file
            config.neurons_per_module = {
                key: [axis, index if isinstance(index, int) else int(index.numel())]
                for key, (axis, index) in self._neft_plan.items()
                if (index if isinstance(index, int) else index.numel()) > 0
            }
        self._neft_plan = {}
