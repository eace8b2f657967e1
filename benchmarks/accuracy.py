"""Held-out commonsense accuracy: zero-shot vs NeuroAda k=1 / k=20 vs LoRA r=8 vs NEAT r=8 vs full fine-tuning.

Does NeuroAda, training ~0.1% of the weights (k=1), match LoRA r=8 and full fine-tuning on the
same budget? Every method trains SmolLM2-135M-Instruct on PIQA (``--sources``: any commonsense
sets; PIQA is the TRL example's default, has real zero-shot signal at 135M and 2 options keep
scoring cheap) with the TRL recipe users run
(``examples/trl/sft.py``: ``SFTTrainer``, its batch size, max length, linear schedule, no warmup,
AdamW), on the same questions in the same order, for the same number of steps, in the same
prompt format (:data:`~harness.commonsense.CLOZE`); only the adapter and the learning
rate differ. Accuracy is the log-likelihood multiple-choice score of
:func:`~harness.commonsense.evaluate_multiple_choice` (adapters merged first).

Protocol (splits: :func:`~harness.commonsense.make_splits`, seed 0, disjoint by question text):

1. ``zero_shot``: the base model, scored once (deterministic).
2. Learning rate: per method, a small grid (:data:`TUNED`) trained with seed 0 and scored on
   the VALIDATION split; the best validation accuracy wins (ties: the larger mean margin of the
   gold option's log-likelihood over the best wrong one). Grid runs are also scored on the
   held-out split, but that number is only *used* for the chosen learning rate, as its seed 0.
3. Seeds 1..n-1 at the chosen learning rate, scored on the HELD-OUT split. A seed picks the
   training sample (``steps x batch`` questions drawn from the train split), the trainer's
   shuffling and the adapter's random initialisation (LoRA's A; NeuroAda starts at zero and
   selects its connections deterministically; full fine-tuning has no init), all methods seeing
   the same questions for the same seed. Reported: mean, sample std and per-seed accuracy.

Measurement: each run is a fresh process (forked from a server that imported torch/TRL once),
so memory is that run's alone. CPU: the kernel's peak RSS (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` at process start: interpreter + libraries + model + training, default
allocator; the same measure just before the first step is reported beside it). CUDA:
``torch.cuda.max_memory_allocated``. Wall time of ``trainer.train()`` only (loading, tokenising
and scoring are reported separately); with 2 threads on 2 cores, other load slows small ops a
lot, so time it on a quiet machine. Trainable parameters are counted on the trained model.
Device and dtype come from the trainer and ``--dtype`` (default: the TRL examples' default).

Budget: 1 zero-shot + 5 methods x (3 grid + 2 more seeds) = 26 runs; on 2 quiet CPU cores about
1.3 hours (an estimate is printed first, and every run prints a line with an ETA). Every finished
run is appended to ``<stem>-runs.jsonl`` in the output folder and skipped when the same command
runs again, so an interrupted run resumes where it stopped; the report is rebuilt from that file.

Usage::

    .venv/bin/python benchmarks/accuracy.py            # full run (~1.3 h on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --quick    # smoke run: tiny random Llama, 2 steps (< 1 min)

Results: ``benchmarks/results/<stem>.{json,md,png}`` with ``stem`` = ``accuracy-<sources>``
(``accuracy-quick`` for ``--quick``), with machine, versions, git commit, command and load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NEUROADA_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _measure import (  # noqa: E402
    MethodRow,
    PeakMemory,
    forkserver_context,
    git_state,
    loadavg,
    machine_info,
    markdown_header,
    method_rows,
    resolve_device,
    run_isolated,
    utc_timestamp,
    version,
    write_results,
)

from harness import commonsense  # noqa: E402

GIB = 1024**3
SFT_EXAMPLE = REPO_ROOT / "examples" / "trl" / "sft.py"


# --------------------------------------------------------------------------------------------
# Methods and settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared row: what it trains and its learning-rate grid."""

    name: str
    label: str
    grid: tuple[float, ...] = ()
    est_step_s: float = 0.0  # SmolLM2-135M, batch 8, 2 quiet CPU cores (for the up-front estimate)
    registered: MethodRow | None = None  # a registered method: its default config (+ the row's overrides)
    trains: bool = True


# Grids: 3 values per row around its sensible centre for a 32-step run (a first 2-value run
# chose an edge value for every method, so each grid was extended on that side; widen further
# with --grid). NeuroAda trains single weights per neuron, so its rates sit ~10x above LoRA's
# (PIQA, 32 steps, k=1: 1e-3 -> -0.015, 5e-3 -> +0.000, 2e-2 -> +0.025, 5e-2 -> +0.03 over
# zero-shot); k=20 moves 20 weights per neuron, so its grid is shifted down. NEAT starts from
# B = 0 like LoRA and has LoRA's parameter shapes: LoRA's grid. SMoA's update (B A) * W0 is scaled by
# the frozen entries (|W0| ~ 0.03), so its factors need larger steps than LoRA's: the grid sits ~5-10x
# above LoRA's. This table also orders the report;
# a registered method without an entry runs with UNTUNED after the rows listed here.
TUNED: dict[str, tuple[tuple[float, ...], float]] = {  # row -> (lr grid, estimated step seconds)
    "neuroada_k1": ((1e-2, 2e-2, 5e-2), 4.5),
    "neuroada_k20": ((2e-3, 5e-3, 2e-2), 5.5),
    "lora_r8": ((2e-3, 5e-3, 1e-2), 4.6),
    "full_ft": ((1e-5, 3e-5, 1e-4), 4.9),
    "neat_r8": ((2e-3, 5e-3, 1e-2), 5.0),
    "smoa_r16": ((1e-2, 3e-2, 1e-1), 7.0),
    "neft_select": ((1e-3, 3e-3, 1e-2), 4.5),
}
UNTUNED = ((2e-3, 5e-3, 1e-2), 5.0)  # LoRA's grid
# Rows beyond each registered method's default config. SMoA r=16 (2 blocks, alpha = r: scale 1 as the
# authors' defaults) trains about LoRA r=8's parameter count.
VARIANTS = {"neuroada": [{"top_k": 20}], "smoa": [{"r": 16, "alpha": 16.0}]}
PEERS = {"lora_r8": "LoRA r=8", "full_ft": "full fine-tuning"}  # PEFT's LoRA (r=8, alpha 16) and every weight
# NeFT as the paper runs it: its neurons chosen by `neuroada-plugin neft-select` on each seed's training
# questions (a full fine-tuning of SELECTION_STEPS steps at the paper's lr), NEFT_SHARE of all parameters.
# The registered row (``neft_share0.004``) is the data-free magnitude ablation.
PEERS["neft_select"] = "NeFT 0.4% (neft-select)"
NEFT_SHARE = 0.004
SELECTION_LR = 2e-5


def compared_methods() -> dict[str, Method]:
    """Zero-shot, then the peers and every registered method's rows (:func:`_measure.method_rows`)."""
    registered = {row.key: row for row in method_rows(VARIANTS)}
    keys = [key for key in TUNED if key in registered or key in PEERS]
    keys += [key for key in registered if key not in TUNED]
    compared = {"zero_shot": Method("zero_shot", "zero-shot", trains=False)}
    for key in keys:
        grid, est_step_s = TUNED.get(key, UNTUNED)
        row = registered.get(key)
        compared[key] = Method(key, row.label if row else PEERS[key], grid, est_step_s, row)
    return compared


METHODS = compared_methods()
EST_EVAL_S_PER_QUESTION = 0.18  # PIQA (2 options), merged model, 2 quiet cores
EST_RUN_OVERHEAD_S = 8.0  # fork, model load, SFTTrainer setup (tokenising the rows)
GRID_EVALS = ("validation", "heldout")  # grid runs: validation chooses; held-out kept for the chosen lr (seed 0)
TRAINER_OVERRIDES = dict(logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)  # no I/O


def example_training_defaults() -> dict[str, Any]:
    """The SFTConfig defaults of ``examples/trl/sft.py`` (the recipe users run), TRL fields only."""
    from trl import SFTConfig

    spec = importlib.util.spec_from_file_location("_neuroada_sft_example", SFT_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    skip = {"output_dir", "learning_rate", "max_steps", "seed"}  # set per run
    return {**{k: v for k, v in module.DEFAULTS.items() if k in fields and k not in skip}, **TRAINER_OVERRIDES}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines the runs' results (a change invalidates the resume cache)."""

    model_id: str
    model_path: str | None  # None: the offline SmolLM2-135M-Instruct
    dtype: str
    sources: str
    split_seed: int
    steps: int
    val_size: int
    heldout_size: int
    eval_batch_size: int
    training: dict[str, Any]

    @property
    def batch_size(self) -> int:
        return int(self.training.get("per_device_train_batch_size", 8))

    def fingerprint(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("model_path")  # the quick model is rebuilt identically in a new temp folder
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_data(
    settings: Settings, seed: int
) -> tuple[list[commonsense.MCQuestion], list[commonsense.MCQuestion], list[commonsense.MCQuestion]]:
    """(train sample of ``seed``, validation, held-out) questions; identical for every method."""
    splits = commonsense.make_splits(commonsense.load_questions(settings.sources), seed=settings.split_seed)
    n_train = min(settings.steps * settings.batch_size, len(splits.train))
    train = random.Random(f"accuracy-train-{seed}").sample(splits.train, n_train)
    return train, splits.validation[: settings.val_size], splits.heldout[: settings.heldout_size]


# --------------------------------------------------------------------------------------------
# One run (in a fresh forkserver child)
# --------------------------------------------------------------------------------------------


def peft_config(method: Method, model: Any, selection_file: str | None = None) -> Any:
    """The row's PEFT config, every method on the same modules (the registry's default targets for the
    model type); ``None`` for full fine-tuning. ``selection_file``: NeFT's, from :func:`neft_selection`."""
    if method.registered is not None:
        return method.registered.config(task_type="CAUSAL_LM")
    if method.name == "neft_select":
        from neuroada_plugin import NeftConfig

        return NeftConfig(selection_file=selection_file, task_type="CAUSAL_LM")
    if method.name == "lora_r8":
        from peft import LoraConfig

        from neuroada_plugin.config_base import DEFAULT_TARGET_MODULES

        targets = DEFAULT_TARGET_MODULES[model.config.model_type]
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return None


def _score(model: Any, tokenizer: Any, questions: list[commonsense.MCQuestion], settings: Settings) -> dict[str, Any]:
    from harness.training import merged_for_inference

    start = time.perf_counter()
    with merged_for_inference(model):
        result = commonsense.evaluate_multiple_choice(
            model, tokenizer, questions, fmt=commonsense.CLOZE, batch_size=settings.eval_batch_size
        )
    margins = [
        row[y] - max(s for j, s in enumerate(row) if j != y)
        for row, y in zip(result.scores, result.labels, strict=True)
    ]
    return {
        "accuracy": result.accuracy,
        "n": result.n,
        "mean_margin": statistics.fmean(margins),
        "eval_s": time.perf_counter() - start,
        "uids": result.uids,
        "labels": result.labels,
        "predictions": result.predictions,
    }


def quiet_libraries() -> None:
    """Keep a child's output to errors: no progress bars, info logs or deprecation notices."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator is found.*")


def neft_selection(settings: Settings, seed: int, train: list[commonsense.MCQuestion], folder: Path) -> dict[str, Any]:
    """The seed's NeFT selection file, made once by the package's command (a separate process, so the run's
    own peak memory is not the selection's); returns its path and the selection's cost from the file."""
    path = folder / f"neft-{settings.fingerprint()}-seed{seed}.json"
    made_here = not path.is_file()
    if made_here:
        from harness.models import smollm2_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        model = settings.model_path or str(smollm2_checkpoint())
        with tempfile.TemporaryDirectory(prefix="neft-select-data-") as scratch:
            data = Path(scratch) / "train.jsonl"
            rows = commonsense.sft_rows(train, commonsense.CLOZE)
            data.write_text("".join(json.dumps(row) + "\n" for row in rows))
            command = [
                sys.executable, "-m", "neuroada_plugin", "neft-select", "--model", model, "--data", str(data),
                "--output", str(path), "--share", str(NEFT_SHARE), "--steps", str(settings.steps),
                "--batch-size", str(settings.batch_size), "--learning-rate", str(SELECTION_LR),
                "--max-length", str(settings.training.get("max_length", 256)), "--dtype", settings.dtype,
                "--seed", str(seed), "--no-progress", "-q",
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"neft-select failed ({done.returncode}):\n{done.stderr[-3000:]}")
    reference = json.loads(path.read_text())["reference_run"]
    return {
        "file": str(path),
        "made_in_this_run": made_here,
        "steps": reference["steps"],
        "learning_rate": reference["learning_rate"],
        "seconds": reference["seconds"],
        "peak_memory_bytes": reference["peak_memory_bytes"],
        "peak_memory_kind": reference["peak_memory_kind"],
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Load, (train,) score: one run of one method at one learning rate and seed."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
    from harness.training import CommonsenseArguments, load_model_and_tokenizer, trainable_parameters

    quiet_libraries()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    settings = Settings(**job["settings"])
    method = METHODS[job["method"]]
    started = time.perf_counter()
    loadavg_start = loadavg()
    # The device the trainer will pick; CPU: peak RSS of this process from here on (its own, fresh).
    memory = PeakMemory(resolve_device("auto"))
    rss_start = memory.start()

    model, tokenizer = load_model_and_tokenizer(
        CommonsenseArguments(model_name_or_path=settings.model_path, dtype=settings.dtype)
    )
    load_s = time.perf_counter() - started
    train, validation, heldout = run_data(settings, job["seed"])
    record: dict[str, Any] = {"load_s": load_s, "n_train_questions": len(train) if method.trains else 0}

    selection_file = None
    if method.name == "neft_select":
        record["selection"] = neft_selection(settings, job["seed"], train, Path(job["selection_dir"]))
        selection_file = record["selection"]["file"]
    if method.trains:
        with tempfile.TemporaryDirectory(prefix="accuracy-run-") as output_dir:
            config = SFTConfig(
                output_dir=output_dir,
                **settings.training,
                learning_rate=job["lr"],
                max_steps=settings.steps,
                seed=job["seed"],
            )
            setup_start = time.perf_counter()
            trainer = SFTTrainer(
                model=model,
                args=config,
                train_dataset=Dataset.from_list(commonsense.sft_rows(train, commonsense.CLOZE)),
                processing_class=tokenizer,
                peft_config=peft_config(method, model, selection_file),
            )
            trainer.remove_callback(PrinterCallback)
            record["setup_s"] = time.perf_counter() - setup_start
            model = trainer.model
            memory_loaded = memory.current()  # model (+ adapter) on its device, before the first step
            train_start = time.perf_counter()
            output = trainer.train()
            record["peak_train_bytes"] = memory.stop()  # synchronises CUDA first
            record["train_s"] = time.perf_counter() - train_start
            record["train_loss"] = output.training_loss
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            record["last_loss"] = losses[-1] if losses else None
            record["steps_done"] = trainer.state.global_step
            del trainer
        memory_method = memory.method
        memory = PeakMemory(memory.device)  # scoring: a second peak, from the trained model on
        memory.start()
    else:
        model.to(memory.device)
        memory_loaded = memory.current()
        memory_method = memory.method
    device = next(model.parameters()).device
    trainable, total = trainable_parameters(model)
    trainable = trainable if method.trains else 0  # the base model's weights all require grad, none trains
    record.update(trainable_params=trainable, total_params=total, trainable_pct=100.0 * trainable / total)
    record["evals"] = {
        name: _score(model, tokenizer, questions, settings)
        for name, questions in (("validation", validation), ("heldout", heldout))
        if name in job["evaluate"]
    }
    record.update(
        peak_bytes=max(memory.stop(), record.get("peak_train_bytes", 0)),
        rss_start_bytes=rss_start,
        memory_loaded_bytes=memory_loaded,
        memory_method=memory_method,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        torch_threads=torch.get_num_threads(),
        loadavg_start=loadavg_start,
        loadavg_end=loadavg(),
        wall_s=time.perf_counter() - started,
    )
    return record


# --------------------------------------------------------------------------------------------
# Orchestration: plan, resume cache, learning-rate choice
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunKey:
    method: str
    lr: float | None
    seed: int
    evaluate: tuple[str, ...]

    def as_id(self, fingerprint: str) -> str:
        lr = "none" if self.lr is None else f"{self.lr:g}"
        return f"{fingerprint}:{self.method}:lr={lr}:seed={self.seed}:{'+'.join(self.evaluate)}"


class RunCache:
    """Finished runs, one JSON line each; lines of other settings (fingerprints) are ignored."""

    def __init__(self, path: Path, fingerprint: str, git: dict[str, Any] | None = None) -> None:
        self.path, self.fingerprint, self.git = path, fingerprint, git or {}
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                if record.get("fingerprint") == fingerprint:
                    self.records[record["id"]] = record

    def get(self, key: RunKey) -> dict[str, Any] | None:
        return self.records.get(key.as_id(self.fingerprint))

    def add(self, key: RunKey, record: dict[str, Any]) -> dict[str, Any]:
        record = {
            "id": key.as_id(self.fingerprint),
            "fingerprint": self.fingerprint,
            **dataclasses.asdict(key),
            **record,
            "git": self.git,  # the code that trained this run (the cache may mix commits)
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.records[record["id"]] = record
        return record


def estimate_s(key: RunKey, settings: Settings) -> float:
    """Rough wall time of one run (SmolLM2-135M on 2 quiet CPU cores; rescaled by measured runs)."""
    method = METHODS[key.method]
    questions = (settings.val_size if "validation" in key.evaluate else 0) + (
        settings.heldout_size if "heldout" in key.evaluate else 0
    )
    step_s = method.est_step_s * settings.batch_size / 8
    return EST_RUN_OVERHEAD_S + settings.steps * step_s + questions * EST_EVAL_S_PER_QUESTION


def choose_lr(grid_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid run with the best validation accuracy (ties: larger mean gold-vs-best-wrong margin)."""
    return max(grid_runs, key=lambda r: (r["evals"]["validation"]["accuracy"], r["evals"]["validation"]["mean_margin"]))


class Runner:
    """Runs (or takes from the cache) each planned run, printing a progress line with an ETA."""

    def __init__(
        self,
        settings: Settings,
        cache: RunCache,
        total_estimate_s: float,
        timeout_s: float,
        threads: int | None,
        cached_only: bool = False,
        selection_dir: Path | None = None,
    ) -> None:
        self.settings, self.cache, self.timeout_s, self.threads = settings, cache, timeout_s, threads
        self.selection_dir = selection_dir or Path(tempfile.gettempdir())
        self.cached_only = cached_only
        self.not_run: list[dict[str, Any]] = []  # --cached-only: planned runs with no cached result
        self.remaining_estimate_s = total_estimate_s
        self.measured_s = self.measured_estimate_s = 0.0
        self.index = self.executed = self.cached = 0
        self.context: Any = None
        self.used: list[dict[str, Any]] = []  # records of this invocation's plan, executed or cached
        self.failures: list[dict[str, Any]] = []

    def skip(self) -> None:
        """Count a planned run that cannot happen (its method's grid failed)."""
        self.index += 1

    def run(self, key: RunKey, count: int) -> dict[str, Any] | None:
        self.index += 1
        label = f"[{self.index}/{count}] {METHODS[key.method].label}"
        label += (f" lr={key.lr:g}" if key.lr is not None else "") + f" seed={key.seed}"
        cached = self.cache.get(key)
        if cached is not None:
            print(f"{label}: cached ({_run_summary(cached)})", flush=True)
            if key.seed > 0:  # seed runs were counted in the estimate before their lr was known
                self.remaining_estimate_s -= estimate_s(key, self.settings)
            self.cached += 1
            self.used.append(cached)
            return cached
        if self.cached_only:
            print(f"{label}: not run (--cached-only)", flush=True)
            self.not_run.append(dataclasses.asdict(key))
            return None
        if self.context is None:  # children fork from a server that imported the libraries once
            self.context = forkserver_context(
                ["torch", "transformers", "peft", "datasets", "trl", "neuroada_plugin", "harness.commonsense"]
            )
        job = {
            "settings": dataclasses.asdict(self.settings),
            "method": key.method,
            "lr": key.lr,
            "seed": key.seed,
            "evaluate": list(key.evaluate),
            "threads": self.threads,
            "selection_dir": str(self.selection_dir),
        }
        estimate = estimate_s(key, self.settings)
        start = time.perf_counter()
        message = run_isolated(self.context, run_one, job, self.timeout_s)
        elapsed = time.perf_counter() - start
        self.remaining_estimate_s -= estimate
        self.measured_s += elapsed
        self.measured_estimate_s += estimate
        eta = max(self.remaining_estimate_s, 0.0) * self.measured_s / max(self.measured_estimate_s, 1e-9)
        if not message["ok"]:
            print(f"{label}: FAILED after {elapsed:.0f}s\n{message['error']}", file=sys.stderr, flush=True)
            self.failures.append({**dataclasses.asdict(key), "error": message["error"][-2000:]})
            return None
        record = self.cache.add(key, message["result"])
        self.executed += 1
        self.used.append(record)
        print(f"{label}: {_run_summary(record)}; {elapsed:.0f}s, ETA {eta / 60:.1f} min", flush=True)
        return record


def _run_summary(record: dict[str, Any]) -> str:
    parts = [f"{name} {ev['accuracy']:.3f}" for name, ev in record["evals"].items()]
    if record.get("train_s") is not None:
        parts.append(f"loss {record['train_loss']:.3f}, train {record['train_s']:.0f}s")
    parts.append(f"peak {record['peak_bytes'] / GIB:.2f} GiB")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def summarize(
    method: Method, grid_runs: list[dict[str, Any]], chosen: dict[str, Any] | None, seed_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per-method row: chosen lr, held-out mean/std over seeds, trainable %, memory, wall time."""
    accs = [r["evals"]["heldout"]["accuracy"] for r in seed_runs]
    trained = [r for r in seed_runs if r.get("train_s") is not None]
    reference = seed_runs[0] if seed_runs else (grid_runs[0] if grid_runs else None)
    grid_lrs = sorted(r["lr"] for r in grid_runs)
    return {
        "method": method.name,
        "label": method.label,
        "grid": [
            {
                "lr": r["lr"],
                "validation_accuracy": r["evals"]["validation"]["accuracy"],
                "validation_mean_margin": r["evals"]["validation"]["mean_margin"],
                "heldout_accuracy": r["evals"]["heldout"]["accuracy"],
                "train_loss": r.get("train_loss"),
            }
            for r in sorted(grid_runs, key=lambda r: r["lr"])
        ],
        "chosen_lr": chosen["lr"] if chosen else None,
        "chosen_at_grid_edge": bool(chosen and len(grid_lrs) > 1 and chosen["lr"] in (grid_lrs[0], grid_lrs[-1])),
        "seeds": [r["seed"] for r in seed_runs],
        "heldout_accuracies": accs,
        "heldout_mean": statistics.fmean(accs) if accs else None,
        "heldout_std": statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
        "heldout_min": min(accs) if accs else None,
        "heldout_max": max(accs) if accs else None,
        "heldout_n_questions": seed_runs[0]["evals"]["heldout"]["n"] if seed_runs else None,
        "trainable_params": reference["trainable_params"] if reference else None,
        "total_params": reference["total_params"] if reference else None,
        "trainable_pct": reference["trainable_pct"] if reference else None,
        "peak_train_bytes": max((r["peak_train_bytes"] for r in trained), default=None),
        "peak_bytes": max((r["peak_bytes"] for r in seed_runs), default=None),
        "memory_loaded_bytes": max((r["memory_loaded_bytes"] for r in seed_runs), default=None),
        "train_s_mean": statistics.fmean(r["train_s"] for r in trained) if trained else None,
        "step_s_mean": statistics.fmean(r["train_s"] / max(r["steps_done"], 1) for r in trained) if trained else None,
        "eval_heldout_s_mean": statistics.fmean(r["evals"]["heldout"]["eval_s"] for r in seed_runs)
        if seed_runs
        else None,
        # NeFT: the reference fine-tuning of neft-select, once per seed (the grid reuses seed 0's file)
        "selection": [
            {"seed": r["seed"], **{k: r["selection"][k] for k in ("steps", "seconds", "peak_memory_bytes")}}
            for r in seed_runs
            if "selection" in r
        ],
    }


def _as_evaluation(ev: dict[str, Any]) -> commonsense.MCEvaluation:
    return commonsense.MCEvaluation(
        uids=ev["uids"],
        sources=[u.rsplit("-", 1)[0] for u in ev["uids"]],
        labels=ev["labels"],
        predictions=ev["predictions"],
        scores=[],
    )


def verdict(summaries: dict[str, dict[str, Any]], runs_by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The target: NeuroAda's best k reaches LoRA r=8's held-out accuracy.

    Compared on the means over seeds, and paired: every seed of both methods trained on the same
    questions and was scored on the same held-out questions, so the per-question difference
    (averaged over seeds) gives a standard error that includes which questions were drawn.
    """
    neuroada = [s for name, s in summaries.items() if name.startswith("neuroada") and s["heldout_mean"] is not None]
    lora = summaries.get("lora_r8")
    if not neuroada or lora is None or lora["heldout_mean"] is None:
        return {"available": False}
    best = max(neuroada, key=lambda s: s["heldout_mean"])
    lora_by_seed = {r["seed"]: r for r in runs_by_method.get("lora_r8", [])}
    pairs, per_question = [], []
    for run in runs_by_method.get(best["method"], []):
        other = lora_by_seed.get(run["seed"])
        if other is None:
            continue
        before, after = _as_evaluation(other["evals"]["heldout"]), _as_evaluation(run["evals"]["heldout"])
        change = commonsense.paired_change(before, after)
        pairs.append({"seed": run["seed"], **dataclasses.asdict(change), "summary": change.summary()})
        per_question.append([int(a) - int(b) for a, b in zip(after.correct, before.correct, strict=True)])
    diff = best["heldout_mean"] - lora["heldout_mean"]
    se_paired = None
    if per_question and len(per_question[0]) > 1:
        mean_by_question = [statistics.fmean(column) for column in zip(*per_question, strict=True)]
        se_paired = statistics.stdev(mean_by_question) / math.sqrt(len(mean_by_question))
    return {
        "available": True,
        "best_neuroada": best["method"],
        "best_neuroada_mean": best["heldout_mean"],
        "lora_mean": lora["heldout_mean"],
        "difference": diff,
        "target_met_on_means": diff >= 0,
        "paired_seeds": len(pairs),
        "se_paired_difference": se_paired,
        "resolved": bool(se_paired is not None and abs(diff) > 2 * se_paired),
        "paired_by_seed": pairs,
    }


def _fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_report(payload: dict[str, Any]) -> list[str]:
    """The ``.md`` report: provenance, the main table, the lr grid, the verdict on the target."""
    s = payload["settings"]
    title = (
        f"Held-out commonsense accuracy ({payload['model_id']}, {s['sources']}{', quick' if payload['quick'] else ''})"
    )
    md = [
        *markdown_header(payload, title),
        f"- trl {payload['trl_version']}; device {payload['device']}, dtype {payload['dtype']}, torch threads "
        f"{payload['torch_threads']}; "
        f"{payload['runs_executed']} runs executed, {payload['runs_cached']} taken from the resume cache "
        f"(`{payload['runs_jsonl']}`)",
        "",
        f"Every method: TRL `SFTTrainer` with the `examples/trl/sft.py` recipe ({s['steps']} steps, batch "
        f"{payload['batch_size']}, {s['training'].get('lr_scheduler_type')} schedule, max_length "
        f"{s['training'].get('max_length')}, AdamW), cloze prompts, the same {payload['n_train_questions']} training "
        f"questions per seed. Learning rate chosen per method on {s['val_size']} validation questions (seed 0); "
        f"held-out: {s['heldout_size']} questions never trained on or used for choosing; "
        "std = sample standard deviation over seeds (seed = training sample, order and adapter init). "
        f"Peak memory: {', '.join(payload['memory_methods'])} of the run's own fresh process during training "
        "(CPU: resident set, interpreter and libraries included; zero-shot: during scoring); `before training` = the "
        "same measure with the model (and adapter) loaded, before the first step. Train s = `trainer.train()` only.",
        "",
        "| method | trainable params (%) | chosen lr | held-out acc mean ± std (n seeds) | per seed | peak memory "
        "| before training | train s/run | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["summary"].values():
        n = len(row["heldout_accuracies"])
        acc = f"{row['heldout_mean']:.3f} ± {row['heldout_std']:.3f} ({n})" if row["heldout_mean"] is not None else "-"
        per_seed = ", ".join(f"{a:.3f}" for a in row["heldout_accuracies"]) or "-"
        trainable = (
            f"{row['trainable_params']:,} ({row['trainable_pct']:.3f}%)" if row["trainable_params"] is not None else "-"
        )
        lr = (
            "-" if row["chosen_lr"] is None else f"{row['chosen_lr']:g}" + (" (grid edge)" * row["chosen_at_grid_edge"])
        )
        md.append(
            f"| {row['label']} | {trainable} | {lr} | {acc} | {per_seed} | "
            f"{_fmt_bytes(row['peak_train_bytes'] or row['peak_bytes'])} | {_fmt_bytes(row['memory_loaded_bytes'])} | "
            f"{_fmt(row['train_s_mean'], '.0f')} | {_fmt(row['step_s_mean'], '.2f')} |"
        )
    for row in payload["summary"].values():
        if row.get("selection"):
            cost = row["selection"]
            md += [
                "",
                f"{row['label']}: selection cost (`neuroada-plugin neft-select`, a full fine-tuning of {cost[0]['steps']} "
                f"steps at lr {SELECTION_LR:g} on the seed's training questions, its own process): "
                + "; ".join(
                    f"seed {c['seed']} {c['seconds']:.0f} s, peak {_fmt_bytes(c['peak_memory_bytes'])}" for c in cost
                )
                + ".",
            ]
    md += [
        "",
        "## Learning-rate grid (seed 0)",
        "",
        "| method | lr | validation acc | validation margin | held-out acc (not used to choose) | mean train loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["summary"].values():
        for g in row["grid"]:
            mark = " **(chosen)**" if g["lr"] == row["chosen_lr"] else ""
            md.append(
                f"| {row['label']} | {g['lr']:g}{mark} | {g['validation_accuracy']:.3f} | "
                f"{g['validation_mean_margin']:.3f} | {g['heldout_accuracy']:.3f} | {_fmt(g['train_loss'], '.3f')} |"
            )
    zero = payload["summary"].get("zero_shot")
    if zero and zero.get("validation_accuracy") is not None:
        md.append(f"| zero-shot | - | {zero['validation_accuracy']:.3f} | - | {zero['heldout_mean']:.3f} | - |")
    md += ["", "## NeuroAda's best k vs LoRA r=8 (the target)", ""]
    v = payload["verdict"]
    if not v["available"]:
        md.append("Not available (NeuroAda or LoRA runs missing).")
    else:
        best = payload["summary"][v["best_neuroada"]]
        se = v["se_paired_difference"]
        md.append(
            f"Best NeuroAda by held-out mean (of k=1 and k=20; picking on held-out favours NeuroAda slightly): "
            f"{best['label']} {v['best_neuroada_mean']:.3f} vs LoRA r=8 {v['lora_mean']:.3f} "
            f"({v['difference']:+.3f}): the target (best k ≥ LoRA r=8) is "
            f"**{'met' if v['target_met_on_means'] else 'not met'}** on the means. "
            + (
                f"Paired over the same {best['heldout_n_questions']} held-out questions and {v['paired_seeds']} "
                f"seed(s), the difference has a standard error of ≈{se:.3f}: it is "
                + (
                    "**resolved** (beyond 2 SE)."
                    if v["resolved"]
                    else "**not resolved** (within 2 SE): a tie at this size."
                )
                if se is not None
                else ""
            )
        )
        for pair in v["paired_by_seed"]:
            md.append(f"- seed {pair['seed']}, LoRA -> {best['label']} on the same questions: {pair['summary']}")
    edges = [row["label"] for row in payload["summary"].values() if row["chosen_at_grid_edge"]]
    if edges:
        md += ["", f"Chosen learning rate at the edge of its grid (the optimum may lie outside): {', '.join(edges)}."]
    if payload["failures"]:
        md += ["", f"**{len(payload['failures'])} run(s) failed**; see the JSON file."]
    if payload.get("not_run"):
        missing = ", ".join(f"{r['method']} seed {r['seed']}" for r in payload["not_run"])
        md += [
            "",
            f"**Incomplete** (`--cached-only`): {len(payload['not_run'])} planned run(s) not run yet: {missing}.",
        ]
    if payload.get("plot"):
        md += ["", f"![held-out accuracy per method]({payload['plot']})"]
    return [*md, ""]


def write_plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Held-out accuracy per method: mean ± std, each seed a dot, zero-shot a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for name, r in payload["summary"].items() if name != "zero_shot" and r["heldout_mean"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.grid(axis="y", alpha=0.3)
    xs = list(range(len(rows)))
    # Points, not bars: the y axis does not start at 0, and bars would exaggerate the differences.
    ax.errorbar(
        xs,
        [r["heldout_mean"] for r in rows],
        yerr=[r["heldout_std"] for r in rows],
        fmt="D",
        color="#08519c",
        ecolor="#3182bd",
        capsize=8,
        markersize=7,
        label="mean ± std over seeds",
        zorder=3,
    )
    for x, row in zip(xs, rows, strict=True):
        accs = row["heldout_accuracies"]
        offsets = [0.18 + (i - (len(accs) - 1) / 2) * 0.06 for i in range(len(accs))]
        seed_label = "one seed" if x == 0 else None
        ax.scatter([x + o for o in offsets], accs, color="#9ecae1", edgecolor="#3182bd", s=18, label=seed_label)
        ax.annotate(
            f"{row['heldout_mean']:.3f}",
            (x, row["heldout_mean"]),
            xytext=(-10, 0),
            textcoords="offset points",
            ha="right",
            va="center",
        )
    zero = payload["summary"].get("zero_shot")
    lows = [r["heldout_min"] for r in rows]
    if zero and zero["heldout_mean"] is not None:
        ax.axhline(zero["heldout_mean"], color="#636363", linestyle="--", label=f"zero-shot {zero['heldout_mean']:.3f}")
        lows.append(zero["heldout_mean"])
    ax.set_xticks(xs, [f"{r['label']}\n{r['trainable_pct']:.3g}% trainable" for r in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(max(0.0, min(lows) - 0.04), min(1.0, max(r["heldout_max"] for r in rows) + 0.04))
    ax.set_ylabel(f"held-out accuracy ({rows[0]['heldout_n_questions']} questions)")
    s = payload["settings"]
    ax.set_title(f"{payload['model_id']}, {s['sources']}, {s['steps']} SFT steps, lr chosen on validation", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_quick_model(folder: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer and chat template."""
    from harness.models import save_tiny_llama

    return save_tiny_llama(folder, seed=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 2 steps, 8 questions")
    parser.add_argument("--model", help="model folder or hub id (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", help="weights dtype (default: the TRL examples' default, float32)")
    parser.add_argument("--sources", default="piqa", help="commonsense sets, comma-separated (default: piqa)")
    parser.add_argument("--steps", type=int, help="SFT steps per run (default 32; quick 2)")
    parser.add_argument("--seeds", type=int, help="seeds per method at the chosen lr (default 3; quick 1)")
    parser.add_argument("--val-size", type=int, help="validation questions for the lr choice (default 100)")
    parser.add_argument("--heldout-size", type=int, help="held-out questions (default 200)")
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "zero_shot"])
    parser.add_argument(
        "--grid", action="append", default=[], metavar="METHOD=LR,LR", help="override a method's lr grid"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and time estimate, run nothing")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: write the report from the runs already finished (the rest are listed as not run)",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--threads", type=int, help="torch threads per run (default: torch's; quick: 1, robust to a busy machine)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace, model_path: str | None) -> tuple[Settings, dict[str, Method]]:
    from harness.training import CommonsenseArguments

    quick = args.quick
    default_args = CommonsenseArguments()
    model_id = "tiny-random-llama (2 layers, hidden 64)" if quick else (args.model or "SmolLM2-135M-Instruct (offline)")
    settings = Settings(
        model_id=model_id,
        model_path=model_path,
        dtype=args.dtype or default_args.dtype,
        sources=",".join(commonsense.parse_sources(args.sources)),
        split_seed=0,
        steps=args.steps or (2 if quick else 32),
        val_size=args.val_size or (8 if quick else 100),
        heldout_size=args.heldout_size or (8 if quick else 200),
        eval_batch_size=default_args.eval_batch_size,
        training=example_training_defaults(),
    )
    methods = {
        name: METHODS[name] for name in ["zero_shot", *(args.methods or [m for m in METHODS if m != "zero_shot"])]
    }
    for override in args.grid:
        name, _, values = override.partition("=")
        if name not in methods or not values:
            raise SystemExit(f"--grid {override!r}: expected METHOD=LR[,LR...] with METHOD in {list(methods)[1:]}")
        methods[name] = dataclasses.replace(methods[name], grid=tuple(float(v) for v in values.split(",")))
    if quick:  # one grid value (the centre)
        methods = {n: dataclasses.replace(m, grid=m.grid[len(m.grid) // 2 :][:1]) for n, m in methods.items()}
    return settings, methods


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    git_at_start = git_state()
    n_seeds = args.seeds or (1 if args.quick else 3)
    stem = "accuracy-quick" if args.quick else f"accuracy-{'-'.join(commonsense.parse_sources(args.sources))}"
    if args.model and not args.quick:
        stem += "-" + Path(args.model.rstrip("/")).name
    with tempfile.TemporaryDirectory(prefix="accuracy-quick-model-") as scratch:
        model_path = str(build_quick_model(Path(scratch))) if args.quick else args.model
        settings, methods = resolve_settings(args, model_path)
        cache = RunCache(args.output_dir / f"{stem}-runs.jsonl", settings.fingerprint(), git_at_start)

        zero_key = RunKey("zero_shot", None, 0, GRID_EVALS)
        plan = [zero_key]
        for name, method in methods.items():
            if method.trains:
                plan += [RunKey(name, lr, 0, GRID_EVALS) for lr in method.grid]
                plan += [RunKey(name, None, seed, ("heldout",)) for seed in range(1, n_seeds)]  # lr chosen later
        todo = [k for k in plan if k.lr is not None or k.method == "zero_shot"]
        pending_estimate = sum(estimate_s(k, settings) for k in todo if cache.get(k) is None)
        pending_estimate += sum(estimate_s(k, settings) for k in plan if k.lr is None and k.method != "zero_shot")
        print(
            f"{len(plan)} runs ({sum(cache.get(k) is not None for k in todo)} cached) of {settings.model_id} on "
            f"{settings.sources}: "
            f"{settings.steps} steps x batch {settings.batch_size}, validation {settings.val_size}, held-out "
            f"{settings.heldout_size}, {n_seeds} seed(s); estimate {pending_estimate / 60:.0f} min "
            + (
                "(calibrated for SmolLM2-135M on 2 quiet CPU cores)"
                if not args.quick
                else "(not calibrated for --quick)"
            ),
            flush=True,
        )
        if args.dry_run:
            for key in plan:
                status = "cached" if cache.get(key) is not None else f"~{estimate_s(key, settings):.0f}s"
                lr = "chosen" if key.lr is None and key.method != "zero_shot" else key.lr
                print(f"  {key.method} lr={lr} seed={key.seed} scored on {'+'.join(key.evaluate)}: {status}")
            return {"plan": [dataclasses.asdict(k) for k in plan], "estimate_s": pending_estimate}
        threads = args.threads or (1 if args.quick else None)
        runner = Runner(
            settings, cache, pending_estimate, args.timeout, threads, cached_only=args.cached_only,
            selection_dir=args.output_dir / f"{stem}-neft-selections",
        )  # fmt: skip
        loadavg_start = loadavg()
        runs_by_method: dict[str, list[dict[str, Any]]] = {}
        summaries: dict[str, dict[str, Any]] = {}
        zero = runner.run(zero_key, len(plan))
        for name, method in methods.items():
            if not method.trains:
                continue
            grid_runs = [runner.run(RunKey(name, lr, 0, GRID_EVALS), len(plan)) for lr in method.grid]
            grid_runs = [r for r in grid_runs if r is not None]
            chosen = choose_lr(grid_runs) if grid_runs else None
            seed_runs = [chosen] if chosen else []
            for seed in range(1, n_seeds):
                if chosen is None:
                    runner.skip()
                elif (record := runner.run(RunKey(name, chosen["lr"], seed, ("heldout",)), len(plan))) is not None:
                    seed_runs.append(record)
            runs_by_method[name] = seed_runs
            summaries[name] = summarize(method, grid_runs, chosen, seed_runs)
        if zero is not None:
            zero_row = summarize(METHODS["zero_shot"], [], None, [zero])
            zero_row["validation_accuracy"] = zero["evals"]["validation"]["accuracy"]
            summaries = {"zero_shot": zero_row, **summaries}

        payload: dict[str, Any] = {
            "benchmark": "accuracy",
            "quick": args.quick,
            "command": shlex.join(["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
            "timestamp": utc_timestamp(),
            "machine": machine_info(resolve_device("auto")),
            "trl_version": version("trl"),
            "git": git_at_start,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg(),
            "wall_s": time.perf_counter() - started,
            "model_id": settings.model_id,
            "model_config": _model_config(model_path),
            "device": runner.used[0]["device"] if runner.used else None,
            "dtype": runner.used[0]["dtype"] if runner.used else None,
            "torch_threads": sorted({r["torch_threads"] for r in runner.used}),
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "model_path"},
            "batch_size": settings.batch_size,
            "n_train_questions": max((r["n_train_questions"] for r in runner.used), default=0),
            "n_seeds": n_seeds,
            "grids": {name: list(m.grid) for name, m in methods.items() if m.trains},
            "memory_methods": sorted({r["memory_method"] for r in runner.used}),
            "runs_executed": runner.executed,
            "runs_cached": runner.cached,
            "runs_jsonl": cache.path.name,
            "summary": summaries,
            "verdict": verdict(summaries, runs_by_method),
            "failures": runner.failures,
            "not_run": runner.not_run,
            "runs": [_strip(r) for r in runner.used],
        }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot = write_plot(payload, args.output_dir / f"{stem}.png")
    payload["plot"] = plot.name if plot else None
    markdown = markdown_report(payload)
    json_path, md_path = write_results(payload, args.output_dir, stem, markdown)
    print("\n".join(markdown))
    print(f"wrote {json_path}, {md_path}" + (f", {plot}" if plot else ""))
    if runner.failures:
        raise SystemExit(f"{len(runner.failures)} run(s) failed")
    return payload


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    """A run record without the per-question lists (those stay in the JSONL file)."""
    evals = {
        name: {k: v for k, v in ev.items() if k not in ("uids", "labels", "predictions")}
        for name, ev in record["evals"].items()
    }
    return {**record, "evals": evals}


def _model_config(model_path: str | None) -> dict[str, Any]:
    """Shape of the model (for checking trainable counts): read from its config.json."""
    from harness.models import smollm2_checkpoint

    folder = Path(model_path) if model_path else smollm2_checkpoint()
    config_file = folder / "config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {k: config.get(k) for k in keys}


if __name__ == "__main__":
    main()
