"""SAFE (selective adapter freezing): CKA, schedule, and the callback in Trainer over every method and LoRA.

References are independent of the callback: CKA against the HSIC formula with an explicit
centring matrix, the schedule against its formula, training against the same run with the
callback's freezes replayed by hand (``requires_grad_(False)`` at the same steps, no probe
forwards), saved-activation bytes against a model whose frozen adapters never trained.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from neuroada_plugin import SAFECallback, SAFEConfig
from neuroada_plugin.registry import methods
from neuroada_plugin.safe import FreezeSchedule, linear_cka

from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS = 12
# Checks every step, warm-up 2 steps, threshold 1.0 by step 8, at most half of the 4 blocks frozen.
SETTINGS = dict(warmup_steps=2, freeze_end_steps=8, check_every=1, max_threshold=1.0, max_frozen_fraction=0.5)
METHODS = [*sorted(methods()), "lora"]


# ----- math ---------------------------------------------------------------------------------------------
def _hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return torch.trace(k @ h @ l_ @ h)


def test_linear_cka_equals_the_hsic_formula_and_its_invariances():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(12, 7, generator=generator, dtype=torch.float64) + 0.3 * torch.randn(
        40, 7, generator=generator, dtype=torch.float64
    )
    kx, ky = x @ x.T, y @ y.T
    reference = _hsic(kx, ky) / torch.sqrt(_hsic(kx, kx) * _hsic(ky, ky))
    assert linear_cka(x, y) == pytest.approx(float(reference), rel=1e-12)
    orthogonal, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ orthogonal + 5.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert linear_cka(x.float(), y.float()) == pytest.approx(float(reference), rel=1e-5)  # float64 inside
    assert linear_cka(torch.ones(5, 3), torch.ones(5, 2)) == 1.0
    assert 0.0 <= linear_cka(x, torch.randn(40, 3, generator=generator, dtype=torch.float64)) < 0.5


def test_threshold_is_zero_in_warm_up_then_cubic_to_its_maximum():
    schedule = FreezeSchedule(warmup_steps=10, freeze_end_step=30, max_threshold=0.8, check_every=5)
    assert [schedule.threshold(t) for t in (0, 10)] == [0.0, 0.0]
    assert schedule.threshold(20) == pytest.approx(0.8 * (1 - 0.5**3))
    assert schedule.threshold(15) == pytest.approx(0.8 * (1 - 0.75**3))
    assert schedule.threshold(30) == schedule.threshold(99) == 0.8
    assert [t for t in range(40) if schedule.is_check_step(t)] == [5, 10, 15, 20, 25, 30]


def test_defaults_follow_the_run_length():
    short, long = SAFEConfig().schedule(10), SAFEConfig().schedule(1000)
    assert (short.warmup_steps, short.freeze_end_step, short.check_every) == (1, 5, 1)
    assert (long.warmup_steps, long.freeze_end_step, long.check_every) == (100, 500, 31)
    explicit = SAFEConfig(warmup_steps=3, freeze_end_steps=7, check_every=2).schedule(1000)
    assert (explicit.warmup_steps, explicit.freeze_end_step, explicit.check_every) == (3, 7, 2)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"max_threshold": 1.5}, "max_threshold=1.5 must be between 0.0 and 1.0"),
        ({"importance": "cosine"}, "importance='cosine' is not one of"),
        ({"warmup_steps": 5, "freeze_end_steps": 5}, "freeze_end_steps (5) must be larger than warmup_steps"),
        ({"warmup_ratio": 0.6, "freeze_end_ratio": 0.5}, "freeze_end_ratio (0.5) must be larger"),
        ({"probe_rows": 2.5}, "probe_rows must be int"),
        ({"freeze_from_input_only": 1}, "freeze_from_input_only must be bool"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings, words):
    with pytest.raises(ValueError) as error:
        SAFEConfig(**settings)
    assert words in str(error.value)


def test_import_stays_light():
    code = (
        "import sys, neuroada_plugin; neuroada_plugin.SAFEConfig; "
        "print('transformers' in sys.modules, 'peft' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


# ----- training -----------------------------------------------------------------------------------------
def _dataset(rows: int = 16, length: int = 24) -> Dataset:
    ids = torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * length] * rows})


def _model(method: str):
    base = tiny_llama(0, vocab_size=256, num_hidden_layers=4)
    if method == "lora":
        config = LoraConfig(r=4, target_modules=TARGETS)
    else:
        config = methods()[method].data_free_config(target_modules=TARGETS)
    model = get_peft_model(base, config)
    model.train()
    return model


def _args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" not in n and p.numel()}


class FreezeRecorder(TrainerCallback):
    """Placed after SAFE: the values of each unit when it froze, and the optimizer at the end."""

    def __init__(self, safe: SAFECallback) -> None:
        self.safe, self.at_freeze, self.optimizer, self.at_last_freeze = safe, {}, None, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        for unit in self.safe.units:
            if unit.frozen and unit.name not in self.at_freeze:
                self.at_freeze[unit.name] = {n: p.detach().clone() for n, p in unit.parameters.items()}
                self.at_last_freeze = _adapter_params(model)


class ReplayFreezes(TrainerCallback):
    """The reference: freeze the named parameters by hand after the given steps' optimizer updates."""

    def __init__(self, plan: dict[int, list[str]]) -> None:
        self.plan = plan

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = set(self.plan.get(state.global_step, []))
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)
                param.grad = None
                optimizer.optimizer.state.pop(param, None)


def _train(method: str, output_dir: Path, callbacks: list, resume: str | None = None, **overrides):
    model = _model(method)
    trainer = Trainer(model=model, args=_args(output_dir, **overrides), train_dataset=_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("method", METHODS)
def test_units_freeze_on_schedule_stay_bit_identical_and_training_equals_the_replayed_freezes(method, tmp_path):
    safe = SAFECallback(**SETTINGS)
    recorder = FreezeRecorder(safe)
    trainer, model = _train(method, tmp_path / "safe", [safe, recorder])
    final = _adapter_params(model)

    # The schedule: only after warm-up, each frozen unit's relative importance below that step's threshold,
    # the least important first, never more than half of the units.
    assert len(safe.units) == 4 and 1 <= len(safe.freeze_steps) <= 2
    for check in safe.history:
        scores = check["scores"]
        top = max(v for v in scores.values() if v is not None)
        for name in check["frozen"]:
            assert check["step"] > SETTINGS["warmup_steps"]
            assert scores[name] / top < check["threshold"]
            assert all(scores[name] <= scores[other] for other in scores if other not in check["frozen"])
    # Frozen units: values bit-identical from their freeze to the end, no gradient, no optimizer state.
    state = recorder.optimizer.optimizer.state
    for unit in safe.units:
        for name, param in unit.parameters.items():
            if unit.frozen:
                assert torch.equal(final[name], recorder.at_freeze[unit.name][name]), name
                assert not param.requires_grad and param.grad is None and param not in state
            else:
                assert param.requires_grad and param in state
    # Metrics in the log history.
    logged = [entry for entry in trainer.state.log_history if "safe/frozen_units" in entry]
    assert logged[-1]["safe/frozen_units"] == len(safe.freeze_steps)

    # Reference: the same run without SAFE, the same parameters frozen by hand at the same steps.
    plan: dict[int, list[str]] = {}
    for unit in safe.units:
        if unit.frozen:
            plan.setdefault(safe.freeze_steps[unit.name], []).extend(unit.parameters)
    reference_trainer, reference = _train(method, tmp_path / "replay", [ReplayFreezes(plan)])
    assert _losses(trainer) == _losses(reference_trainer)
    expected = _adapter_params(reference)
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name
    # Training went on after the last freeze.
    still_training = [n for unit in safe.units if not unit.frozen for n in unit.parameters]
    assert any(not torch.equal(final[n], recorder.at_last_freeze[n]) for n in still_training)


def test_resume_restores_the_frozen_set_and_the_schedule(tmp_path):
    uninterrupted = SAFECallback(**SETTINGS)
    _, whole = _train("neuroada", tmp_path / "whole", [uninterrupted])
    first = SAFECallback(**SETTINGS)
    _train("neuroada", tmp_path / "cut", [first], save_strategy="steps", save_steps=5)
    resumed = SAFECallback(**SETTINGS)  # a fresh instance, as in a new process
    _, model = _train("neuroada", tmp_path / "cut", [resumed], resume=str(tmp_path / "cut" / "checkpoint-5"))
    frozen_at_5 = {name for name, step in uninterrupted.freeze_steps.items() if step <= 5}
    assert frozen_at_5, "the settings must freeze something by the checkpoint"
    assert resumed.freeze_steps == uninterrupted.freeze_steps
    assert [c["frozen"] for c in resumed.history] == [c["frozen"] for c in uninterrupted.history]
    expected, got = _adapter_params(whole), _adapter_params(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class BottomFirst(SAFECallback):
    """SAFE with its choice fixed to 'the lowest unit still training': the memory mechanics, whatever the scores."""

    def _choose(self, scores, threshold):
        training = [unit for unit in self._units if not unit.frozen]
        return training[:1] if threshold > 0 and len(self.freeze_steps) < 2 else []


def _saved_bytes_and_grad_flags(model, batch) -> tuple[int, list[bool]]:
    """Bytes autograd saves for backward in one training forward, and whether each block's output requires grad."""
    total, flags = 0, []

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    layers = model.get_base_model().model.layers
    handles = [layer.register_forward_hook(lambda m, a, out: flags.append(out.requires_grad)) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return total, flags


class MemoryProbe(TrainerCallback):
    def __init__(self, batch) -> None:
        self.batch, self.by_step = batch, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = _saved_bytes_and_grad_flags(model, self.batch)


def test_freezing_the_lowest_units_stops_autograd_below_them(tmp_path):
    batch = {"input_ids": torch.tensor(_dataset()[:4]["input_ids"])}
    safe, probe = BottomFirst(**SETTINGS), MemoryProbe(batch)
    model = _model("neuroada")
    model.enable_input_require_grads()  # what PEFT and TRL add with gradient checkpointing or a quantized base
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[safe, probe]).train()
    assert sorted(safe.freeze_steps.values()) == [3, 4]
    before, flags_before = probe.by_step[2]
    one, flags_one = probe.by_step[3]
    after, flags_after = probe.by_step[4]
    assert flags_before == [True] * 4 and flags_one == [False, True, True, True]
    assert flags_after == [False, False, True, True]
    assert before > one > after

    # Reference: a fresh model whose two lowest blocks' adapters never trained, and no input-grad hook.
    reference = _model("neuroada")
    for name, param in reference.named_parameters():
        if any(f"layers.{i}." in name for i in (0, 1)):
            param.requires_grad_(False)
    assert _saved_bytes_and_grad_flags(reference, batch)[0] == after


def test_reentrant_checkpointing_is_reported_as_keeping_memory(tmp_path, capsys):
    safe = BottomFirst(**SETTINGS)
    model = _model("lora")
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[safe]).train()
    assert "activation memory cannot drop: gradient checkpointing is reentrant" in capsys.readouterr().out
    assert safe.freeze_steps  # freezing still happens; only the saving is lost


def test_fsdp_and_deepspeed_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    safe = SAFECallback()
    trainer = Trainer(model=_model("lora"), args=_args(tmp_path), train_dataset=_dataset(), callbacks=[safe])
    with pytest.raises(ValueError, match="cannot run under FSDP: SAFE changes which parameters train"):
        safe.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)


@pytest.mark.parametrize("setting", [None, True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("wrapper", ["peft_model", "bare_model"])
def test_the_ddp_check_reads_find_unused_parameters_as_the_trainer_gives_it(wrapper, checkpointing, setting, tmp_path):
    """Reference: the DDP kwargs Transformers' own Trainer builds for the same model and arguments."""
    from peft import inject_adapter_in_model

    from neuroada_plugin.safe.callback import _ddp_finds_unused_parameters

    if wrapper == "peft_model":
        model = _model("lora")
    else:  # a PreTrainedModel carrying adapter layers, as when a framework injects them itself
        model = inject_adapter_in_model(LoraConfig(r=4, target_modules=TARGETS), tiny_llama(0, vocab_size=256))
    args = _args(tmp_path, ddp_find_unused_parameters=setting, gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    (handler,) = trainer._build_accelerator_args()["kwargs_handlers"]
    assert _ddp_finds_unused_parameters(args, trainer.model) is handler.find_unused_parameters
    if wrapper == "bare_model" and checkpointing and setting is None:
        assert handler.find_unused_parameters is False  # the case the check exists for


def test_trl_sft_with_gradient_checkpointing(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from harness import commonsense as cs
    from neuroada_plugin import NeuroAdaConfig

    rows = cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:4])
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=True,
        bf16=False,
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )
    safe = SAFECallback(warmup_steps=1, freeze_end_steps=4, check_every=1, max_threshold=1.0)
    recorder = FreezeRecorder(safe)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
        peft_config=NeuroAdaConfig(top_k=2),
        callbacks=[safe, recorder],
    )
    before = _adapter_params(trainer.model)
    trainer.train()
    after = _adapter_params(trainer.model)
    [frozen] = [unit for unit in safe.units if unit.frozen]  # 2 blocks, at most 75% frozen: one
    [training] = [unit for unit in safe.units if not unit.frozen]
    for name in frozen.parameters:
        assert torch.equal(after[name], recorder.at_freeze[frozen.name][name])
    assert any(not torch.equal(after[n], recorder.at_last_freeze[n]) for n in training.parameters)
    assert all(not torch.equal(before[n], recorder.at_freeze[frozen.name][n]) for n in list(frozen.parameters)[:1])
    assert safe.history[0]["scores"] and all(v is not None for v in safe.history[-1]["scores"].values())
