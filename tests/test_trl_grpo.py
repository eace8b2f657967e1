"""TRL GRPOTrainer with NeuroAdaConfig and beta > 0: the KL reference is the adapter-disabled policy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig

ROOT = Path(__file__).resolve().parent.parent


def _distinct_characters(completions, **_) -> list[float]:
    """A reward that varies between samples of a random model, so advantages (and updates) are non-zero."""
    return [len(set(cs.completion_text(c))) / 10.0 for c in completions]


def _config(output_dir: Path, **overrides) -> GRPOConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        learning_rate=5e-2,
        beta=0.04,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def test_grpo_with_kl_to_the_disabled_adapter(tiny_llama_dir, tmp_path):
    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
        reward_funcs=[cs.option_reward, _distinct_characters],
        args=_config(tmp_path / "out"),
        train_dataset=Dataset.from_list(cs.grpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
        peft_config=NeuroAdaConfig(),
    )
    assert trainer.ref_model is None
    model = trainer.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "neuroada_" not in n}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3
    # Step 1: theta = 0, so the policy is the reference bit for bit and the KL estimate is exactly 0.
    assert logs[0]["kl"] == 0.0
    assert logs[-1]["kl"] > 0.0
    assert all(0.0 <= entry["rewards/option_reward/mean"] <= 1.0 for entry in logs)

    thetas = [p for n, p in model.named_parameters() if "neuroada_theta" in n]
    assert len(thetas) == 14 and all(t.abs().sum() > 0 for t in thetas)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "neuroada_" not in n)

    # The reference TRL used (adapter disabled) is exactly the untouched base model.
    ids = torch.tensor([[1, 523, 9861, 30, 2, 17, 42, 4096]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["smoa", "neft"])
def test_grpo_trains_smoa_and_neft_with_kl_to_the_disabled_adapter(tiny_llama_dir, tmp_path, method):
    """The same run with SMoA and NeFT (their data-free configs): zero-initialised, so the first KL is exactly 0;
    every trainable tensor moves, the base does not, and the disabled adapter is the base model bit for bit."""
    from neuroada_plugin.registry import get_method

    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
        reward_funcs=[cs.option_reward, _distinct_characters],
        args=_config(tmp_path / "out"),
        train_dataset=Dataset.from_list(cs.grpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
        peft_config=get_method(method).data_free_config(),
    )
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert initial and all(f".{method}_" in n for n in initial)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3 and logs[0]["kl"] == 0.0 and logs[-1]["kl"] > 0.0
    moved = [n for n, p in model.named_parameters() if n in initial and not torch.equal(p, initial[n])]
    assert moved, f"no {method} tensor trained"
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)

    ids = torch.tensor([[1, 523, 9861, 30, 2, 17, 42, 4096]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_grpo_example_script_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "trl"))
    sys.modules.pop("grpo", None)
    import grpo  # noqa: PLC0415

    from harness.method_args import method_arguments
    from harness.safe_args import safe_arguments
    from harness.training import CommonsenseArguments

    data = CommonsenseArguments(
        model_name_or_path=str(tiny_llama_dir),
        dtype="float32",
        sources="obqa",
        train_size=4,
        eval_size=4,
        show_options=grpo.DEFAULTS["show_options"],
    )
    assert data.show_options  # GRPO needs the options in the prompt to name one
    settings = {k: v for k, v in grpo.DEFAULTS.items() if k != "show_options"}
    settings.update(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8)
    settings.update(disable_tqdm=True, max_completion_length=4)
    grpo.main(data, method_arguments("neuroada")(), safe_arguments()(), GRPOConfig(**settings))
    printed = capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    heldout = cs.make_splits(cs.load_questions("obqa")).heldout[:4]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = cs.evaluate_multiple_choice(base, tokenizer, heldout, fmt=cs.LETTERED)
    tuned = PeftModel.from_pretrained(base, tmp_path / "out")
    after = cs.evaluate_multiple_choice(tuned, tokenizer, heldout, fmt=cs.LETTERED)
    assert f"[before] held-out {before.summary()}" in printed
    assert f"[after] held-out {after.summary()}" in printed
    assert "==== GRPO + NeuroAda summary ====" in printed


@pytest.mark.parametrize(
    ("completion", "reward"),
    [("B. quit eating lunch out", 1.0), ("quit eating lunch out", 1.0), ("A. make more phone calls", 0.0)],
)
def test_option_reward_on_a_real_question(completion, reward):
    question = next(q for q in cs.load_source("obqa") if q.question.startswith("A person wants to start saving"))
    [row] = cs.grpo_rows([question])
    got = cs.option_reward(
        [[{"role": "assistant", "content": completion}]], answer_letter=[row["answer_letter"]], options=[row["options"]]
    )
    assert got == [reward]
