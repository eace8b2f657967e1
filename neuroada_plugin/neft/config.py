"""Configuration of NeFT (neuron-level fine-tuning, Xu et al., COLING 2025, arXiv 2403.11621)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config_base import MethodConfig

SELECTIONS = ("file", "magnitude", "random")


@dataclass
class NeftConfig(MethodConfig):
    """NeFT: train whole neurons (rows of ``up_proj``, columns of ``down_proj``) chosen under one global budget.

    The paper's selection (``selection="file"``, the default) comes from a file written by
    ``neuroada-plugin neft-select``, which fine-tunes the model briefly on your data and picks the neurons
    whose weights turned most (lowest cosine similarity). ``"magnitude"`` (largest norm) and ``"random"``
    (seeded) are data-free ablations that need ``num_neurons`` or ``neuron_share``. Only the selected
    neurons' values are trainable (a bypass, never a dense copy of a weight); merging writes them into the
    weight exactly.
    """

    method_name = "neft"

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Candidate layers (names or regex); None: up_proj and down_proj, as the paper."},
    )
    selection: str = field(
        default="file",
        metadata={"help": f"How neurons are chosen: one of {', '.join(SELECTIONS)} ('file': the paper's, from neft-select)."},
    )
    selection_file: str | None = field(
        default=None, metadata={"help": "The JSON file written by `neuroada-plugin neft-select` (selection='file')."}
    )
    num_neurons: int | None = field(
        default=None, metadata={"help": "Global budget of a data-free selection, as a neuron count over all layers."}
    )
    neuron_share: float | None = field(
        default=None,
        metadata={"help": "Global budget of a data-free selection, as a share of all model parameters (0.004 = 0.4%)."},
    )
    column_modules: list[str] | None = field(
        default_factory=lambda: ["down_proj"],
        metadata={
            "help": "Targeted layers (name suffixes) whose neurons are input columns (the paper's down_proj); "
            "every other targeted layer's neurons are its output rows."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of selection='random'."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "Start the selected neurons' updates at zero (True) or small random values (False, tests)."},
    )
    neurons_per_module: dict[str, list] | None = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is created ({layer: [axis, count]}) and saved with it, so that "
            "loading knows every shape without the selection file. Leave unset."
        },
    )

    def _validate(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"NeftConfig.selection must be one of {list(SELECTIONS)}, got {self.selection!r}.")
        for name in ("num_neurons", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"NeftConfig.{name} must be an integer, got {value!r}.")
        if self.num_neurons is not None and self.num_neurons < 1:
            raise ValueError(f"NeftConfig.num_neurons must be >= 1 (a neuron count), got {self.num_neurons}.")
        share = self.neuron_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1):
            raise ValueError(f"NeftConfig.neuron_share must be a number in (0, 1) (0.004 = 0.4%), got {share!r}.")
        if self.neurons_per_module is not None:
            return  # a saved adapter being loaded: its file brings the neurons
        if self.selection != "file" and self.selection_file:
            raise ValueError(
                f"NeftConfig: selection_file is set but selection={self.selection!r}, which does not read it. Use "
                "selection='file' (the default) or drop selection_file."
            )
        if self.selection == "file" and self.selection_file and not Path(self.selection_file).is_file():
            raise ValueError(
                f"NeftConfig.selection_file {self.selection_file} does not exist. Make it with `neuroada-plugin "
                f"neft-select --model <model> --data <train.jsonl> --output {self.selection_file}`."
            )
        if self.selection == "file":
            if self.num_neurons is not None or self.neuron_share is not None:
                raise ValueError(
                    "NeftConfig: num_neurons / neuron_share set with selection='file'; the budget of a file selection "
                    "is chosen by neft-select. Drop them, or use selection='magnitude' or 'random'."
                )
        elif (self.num_neurons is None) == (self.neuron_share is None):
            raise ValueError(
                f"NeftConfig(selection={self.selection!r}) needs its global budget as exactly one of num_neurons or "
                "neuron_share."
            )
        if isinstance(self.column_modules, str):
            self.column_modules = [self.column_modules]
