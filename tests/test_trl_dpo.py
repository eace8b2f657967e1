"""TRL DPOTrainer with NeuroAdaConfig: the reference is the policy with the adapter disabled."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig

ROOT = Path(__file__).resolve().parent.parent


def _trainer(model_dir: Path, output_dir: Path, **overrides) -> DPOTrainer:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        bf16=False,
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    questions = cs.make_splits(cs.load_source("obqa")).train[:2]  # same batch every step
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=DPOConfig(**settings),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=NeuroAdaConfig(),
    )


def _logs(trainer: DPOTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_dpo_first_loss_is_ln2_and_theta_trains(tiny_llama_dir, tmp_path, gradient_checkpointing):
    trainer = _trainer(tiny_llama_dir, tmp_path / "out", gradient_checkpointing=gradient_checkpointing)
    assert trainer.ref_model is None  # the reference forward runs through model.disable_adapter()
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "neuroada_" not in n}
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 3
    # Step 1: theta = 0, so policy == reference: every log-ratio is 0 and the loss is -log(sigmoid(0)).
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # Later steps move theta, and the same batch becomes preferred more strongly.
    assert logs[2]["loss"] < math.log(2) - 1e-3
    assert logs[2]["rewards/margins"] > 0
    thetas = [p for n, p in trainer.model.named_parameters() if "neuroada_theta" in n]
    assert len(thetas) == 14 and all(t.abs().sum() > 0 for t in thetas)
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if "neuroada_" not in n)


def test_dpo_example_script_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "trl"))
    sys.modules.pop("dpo", None)
    import dpo  # noqa: PLC0415

    from harness.method_args import method_arguments
    from harness.safe_args import safe_arguments
    from harness.training import CommonsenseArguments

    data = CommonsenseArguments(
        model_name_or_path=str(tiny_llama_dir), dtype="float32", sources="obqa", train_size=4, eval_size=4
    )
    settings = dict(dpo.DEFAULTS, output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2)
    settings["disable_tqdm"] = True
    dpo.main(data, method_arguments("neuroada")(), safe_arguments()(), DPOConfig(**settings))
    printed = capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    heldout = cs.make_splits(cs.load_questions("obqa")).heldout[:4]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = cs.evaluate_multiple_choice(base, tokenizer, heldout)
    after = cs.evaluate_multiple_choice(PeftModel.from_pretrained(base, tmp_path / "out"), tokenizer, heldout)
    assert f"[before] held-out {before.summary()}" in printed
    assert f"[after] held-out {after.summary()}" in printed
    assert "==== DPO + NeuroAda summary ====" in printed
    assert f"adapter saved to: {(tmp_path / 'out').resolve()}" in printed
