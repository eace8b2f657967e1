"""``SAFECallback``: SAFE's warm-up, importance checks and progressive freezing as a Transformers callback.

SAFE (Son et al., NAACL 2025, arXiv 2412.03587) scores every adapter by how much it changes its
layer's representations (CKA) and freezes the least important ones on a rising (cubic)
threshold. Paper: the two phases, CKA, the cubic schedule. Reconstructed here (no code or
hyper-parameters were released): the CKA reading, the schedule's formula, relative importance
(score over the highest score), the defaults, block units, the caps. See ``docs/safe.md``.

The callback works on whatever PEFT adapter trains (this package's methods and PEFT's LoRA) in
``Trainer`` and every TRL trainer, since it only uses hooks and the trainer's callback events:
- importance: forward hooks on a fixed probe batch (the first rows of the first training batch),
  one no-grad eval forward per check;
- freezing, after the optimizer step: ``requires_grad`` off, gradient and optimizer state
  dropped, values untouched (AdamW skips a parameter without gradient);
- memory: once the unit nearest the input is frozen, the embedding output is detached so that
  autograd records nothing below the lowest trainable adapter;
- checkpoints: the frozen set, the score history and the probe are part of ``trainer_state.json``
  (``stateful_callbacks``), so ``resume_from_checkpoint`` continues the same schedule.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .config import SAFEConfig
from .graph import EmbeddingCut
from .probe import ProbeBatch, score_units
from .schedule import FreezeSchedule
from .units import AdapterUnit, find_units

__all__ = ["SAFECallback"]

_REFERENCE_FILE = "safe_reference-rank{rank}.pt"


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _refuse_unsupported_parallelism(args: TrainingArguments, model: nn.Module) -> None:
    """FSDP and DeepSpeed fix the trainable set when they wrap the model; DDP needs find_unused_parameters."""
    fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    deepspeed = bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1",
        "true",
    )
    if fsdp or deepspeed:
        name = "FSDP" if fsdp else "DeepSpeed"
        raise ValueError(
            f"SAFECallback cannot run under {name}: SAFE changes which parameters train in the middle of the run, "
            f"while {name} fixes the trainable set (flat parameters / optimizer partitions) when it wraps the model. "
            "Train with DDP (find_unused_parameters=True) or a single process, or remove the SAFE callback."
        )
    _, world = _distributed()
    if world > 1 and not _ddp_finds_unused_parameters(args, model):
        raise ValueError(
            "SAFECallback under DDP needs find_unused_parameters=True: frozen adapters get no gradient, which DDP "
            "with find_unused_parameters=False reports as an error at the next step. Set "
            "ddp_find_unused_parameters=True (Transformers picks False by itself for a bare model trained with "
            "gradient checkpointing)."
        )


def _ddp_finds_unused_parameters(args: TrainingArguments, model: nn.Module) -> bool:
    """The ``find_unused_parameters`` the Trainer gives DDP: the argument, else its rule for unset.

    Callbacks see the unwrapped model, so this follows ``Trainer._build_accelerator_args``: unset means
    False for a ``PreTrainedModel`` with activation checkpointing on (True for a ``PeftModel``).
    """
    if args.ddp_find_unused_parameters is not None:
        return bool(args.ddp_find_unused_parameters)
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return True
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not (bool(checkpointing) or bool(getattr(args, "activation_checkpointing", False)))


class SAFECallback(TrainerCallback, ExportableState):
    """Selective adapter freezing (SAFE) for any PEFT adapter: ``Trainer(..., callbacks=[SAFECallback()])``.

    Settings are :class:`SAFEConfig` fields, given as a config or as keyword arguments
    (``SAFECallback(max_threshold=0.6)``). Step counts default to fractions of ``state.max_steps``
    (warm-up 10%, freezing ends at 50%, a check every ``max_steps // 32`` steps), so a short run
    with defaults also warms up and freezes. Every check logs a line when something freezes and
    adds ``safe/*`` metrics to the next log: ``frozen_units``, ``frozen_fraction``,
    ``trainable_parameters``, ``threshold``.

    Not supported: FSDP and DeepSpeed (refused when training starts, with the reason). Memory
    cannot drop while the unit nearest the input trains (freezing a middle unit saves only its
    own adapter's tensors and gradients), with reentrant gradient checkpointing, or when the input
    embedding trains (``modules_to_save``).
    """

    def __init__(self, config: SAFEConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = SAFEConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        self.config = config
        # Checkpointed state (ExportableState "attributes"): unit -> step frozen, per-check history, probe.
        self.freeze_steps: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.probe_state: dict[str, Any] | None = None
        self._units: list[AdapterUnit] = []
        self._probe = ProbeBatch(config.probe_rows)
        self._grams: dict[str, torch.Tensor] | None = None
        self._schedule: FreezeSchedule | None = None
        self._optimizer: Any = None
        self._model: nn.Module | None = None
        self._guards: list[Any] = []
        self._cut = EmbeddingCut()
        self._pending_metrics: dict[str, float] = {}
        self._main_process = True

    # ----- checkpoint state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Constructor arguments and progress, written to ``trainer_state.json`` with each checkpoint."""
        probe = self._probe.to_json() if self._probe.ready else self.probe_state
        return {
            "args": dataclasses.asdict(self.config),
            "attributes": {
                "freeze_steps": dict(self.freeze_steps),
                "history": list(self.history),
                "probe_state": probe,
            },
        }

    def _restore(self, state: TrainerState) -> None:
        """On resume: take the progress stored in the checkpoint's trainer state (if this instance has none)."""
        if self.freeze_steps or self.history or self.probe_state:
            return  # restored by the Trainer (restore_callback_states_from_checkpoint=True)
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[-1]
        if not stored:
            return
        attributes = stored.get("attributes", {})
        self.freeze_steps = {name: int(step) for name, step in attributes.get("freeze_steps", {}).items()}
        self.history = list(attributes.get("history", []))
        self.probe_state = attributes.get("probe_state")

    # ----- trainer events ---------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("SAFECallback needs the trainer to pass the model to its callbacks.")
        _refuse_unsupported_parallelism(args, model)
        self._model, self._optimizer = model, optimizer
        self._main_process = state.is_world_process_zero
        self._schedule = self.config.schedule(state.max_steps)
        self._units = find_units(model, self.config.granularity)
        if state.global_step > 0:
            self._restore(state)
            self._load_reference(args, state)
        if self.probe_state:
            self._probe.load_json(self.probe_state)
        else:
            self._probe.capture_from(model)
        known = {unit.name for unit in self._units}
        unknown = sorted(set(self.freeze_steps) - known)
        if unknown:
            raise ValueError(
                f"SAFECallback: the checkpoint's frozen units {unknown} are not adapter units of this model "
                f"(units: {sorted(known)[:5]}...); resume with the same model, adapter and SAFE granularity."
            )
        for unit in self._units:
            if unit.name in self.freeze_steps:
                self._freeze(unit)
        self._update_graph_cut()
        self._say(
            f"{len(self._units)} adapter units ({self.config.granularity}), warm-up to step "
            f"{self._schedule.warmup_steps}, freezing until step {self._schedule.freeze_end_step}, check every "
            f"{self._schedule.check_every} steps"
            + (f"; resumed with {len(self.freeze_steps)} frozen" if self.freeze_steps else "")
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        schedule = self._schedule
        if schedule is None or not schedule.is_check_step(state.global_step) or not self._probe.ready:
            return
        self.probe_state = None  # the live probe is the state from now on
        step = state.global_step
        scores, grams = score_units(
            self._model, self._units, self._probe, self.config.importance, self.config.probe_tokens, self._grams
        )
        scores = self._agree(scores)
        # only the 'drift' reading compares with the previous check; 'disabled' keeps nothing (~0.5 MiB a module)
        self._grams = grams if self.config.importance == "drift" else None
        threshold = schedule.threshold(step)
        chosen = self._choose(scores, threshold)
        for unit in chosen:
            self._freeze(unit)
            self.freeze_steps[unit.name] = step
        self._update_graph_cut()
        self.history.append(
            {
                "step": step,
                "threshold": threshold,
                "scores": {name: (None if value is None else round(value, 8)) for name, value in scores.items()},
                "frozen": [unit.name for unit in chosen],
            }
        )
        self._pending_metrics = self.metrics(threshold)
        if chosen:
            names = ", ".join(unit.name for unit in chosen)
            self._say(
                f"step {step}: froze {names} (relative importance < {threshold:.3f}); "
                f"{len(self.freeze_steps)}/{len(self._units)} units frozen, "
                f"{self._pending_metrics['safe/trainable_parameters']:,.0f} adapter parameters still train"
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not self._units or "loss" not in logs:
            return  # training logs only (not eval or the final summary)
        values = {**self.metrics(), **self._pending_metrics}
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)
        self._pending_metrics = {}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.config.importance != "drift" or self._grams is None:
            return
        rank, _ = _distributed()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            path = os.path.join(folder, _REFERENCE_FILE.format(rank=rank))
            torch.save(self._grams, path + ".tmp")
            os.replace(path + ".tmp", path)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._probe.remove_hook()
        self._cut.remove()
        for handle in self._guards:
            handle.remove()
        self._guards = []

    # ----- decisions --------------------------------------------------------------------------------
    def _agree(self, scores: dict[str, float | None]) -> dict[str, float | None]:
        """The mean of every rank's scores (each rank probes its own rows), so all ranks freeze the same units."""
        _, world = _distributed()
        if world == 1 or not scores:
            return scores
        names = sorted(scores)
        device = next(p.device for p in self._model.parameters())
        values = torch.tensor(
            [math.nan if scores[n] is None else scores[n] for n in names], dtype=torch.float64, device=device
        )
        torch.distributed.all_reduce(values)
        values /= world
        return {n: (None if math.isnan(v) else v) for n, v in zip(names, values.tolist(), strict=True)}

    def _choose(self, scores: dict[str, float | None], threshold: float) -> list[AdapterUnit]:
        """Units to freeze now: relative importance below ``threshold``, least important first, within the caps."""
        known = [v for v in scores.values() if v is not None]
        if threshold <= 0 or not known or max(known) <= 0:
            return []
        top = max(known)
        cap = min(math.floor(self.config.max_frozen_fraction * len(self._units)), len(self._units) - 1)
        budget = cap - len(self.freeze_steps)
        training = [unit for unit in self._units if not unit.frozen]
        candidates = [u for u in training if scores.get(u.name) is not None and scores[u.name] / top < threshold]
        if self.config.freeze_from_input_only:
            chosen = []
            for unit in training:  # input side first: stop at the first unit that stays
                if unit not in candidates or len(chosen) >= budget:
                    break
                chosen.append(unit)
            return chosen
        candidates.sort(key=lambda unit: (scores[unit.name], unit.order))
        return candidates[: max(budget, 0)]

    def _freeze(self, unit: AdapterUnit) -> None:
        unit.freeze(self._optimizer)

        def guard(module: nn.Module, args: tuple) -> None:
            unit.keep_frozen()

        self._guards.extend(module.register_forward_pre_hook(guard) for module in unit.modules.values())

    def _update_graph_cut(self) -> None:
        """Detach the embedding output once the unit nearest the input is frozen (memory below it then drops)."""
        if self._cut.installed or not self._units or not self._units[0].frozen:
            return
        ok, why = EmbeddingCut.applicable(self._model)
        if ok:
            self._cut.install(self._model)
        else:
            self._say(f"the lowest adapters are frozen but activation memory cannot drop: {why}")

    def _load_reference(self, args: TrainingArguments, state: TrainerState) -> None:
        if self.config.importance != "drift":
            return
        rank, _ = _distributed()
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", _REFERENCE_FILE.format(rank=rank))
        if os.path.exists(path):
            self._grams = torch.load(path, weights_only=True)
        else:
            self._say(f"no drift reference at {path}: the next check only records one")

    # ----- reporting --------------------------------------------------------------------------------
    def metrics(self, threshold: float | None = None) -> dict[str, float]:
        """``safe/*`` values for the log: frozen units, their fraction, adapter parameters still training."""
        frozen = sum(unit.frozen for unit in self._units)
        values = {
            "safe/frozen_units": float(frozen),
            "safe/frozen_fraction": frozen / max(len(self._units), 1),
            "safe/trainable_parameters": float(sum(u.num_parameters() for u in self._units if not u.frozen)),
        }
        if threshold is not None:
            values["safe/threshold"] = threshold
        return values

    @property
    def units(self) -> list[AdapterUnit]:
        """The adapter units found when training began, input side first."""
        return list(self._units)

    def _say(self, message: str) -> None:
        if self._main_process:
            print(f"[SAFE] {message}", flush=True)
