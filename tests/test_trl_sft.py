"""TRL SFTTrainer with NeuroAdaConfig on a tiny Llama and real commonsense rows."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig

ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int = 2) -> list[dict]:
    return cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:n])


def _config(output_dir: Path, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=2,  # = the dataset: every step sees the same batch
        learning_rate=3e-2,
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
    return SFTConfig(**settings)


def _trainer(model_dir: Path, args: SFTConfig, rows: list[dict] | None = None, **config) -> SFTTrainer:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows or _rows()),
        processing_class=tokenizer,
        peft_config=NeuroAdaConfig(**config),
    )


def _losses(trainer: SFTTrainer, after_step: int = 0) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > after_step]


def _thetas(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "neuroada_theta" in n}


def _reference_loss(model_dir: Path, rows: list[dict]) -> float:
    """Mean NLL of the answer tokens under the base model, tokenised independently of TRL."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            assert full.startswith(prompt)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            token_nll = -logprobs.gather(1, targets[:, None])[:, 0]
            total += token_nll[n_prompt - 1 :].sum().item()
            count += len(targets) - (n_prompt - 1)
    return total / count


def test_sft_trains_only_theta_and_the_adapter_reloads(tiny_llama_dir, tmp_path):
    rows = _rows()
    trainer = _trainer(tiny_llama_dir, _config(tmp_path / "out"), rows)
    model = trainer.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "neuroada_" not in n}
    indices_before = {n: b.clone() for n, b in model.named_buffers() if "neuroada_indices" in n}
    assert set(n for n, p in model.named_parameters() if p.requires_grad) == set(_thetas(model))
    assert all((t == 0).all() for t in _thetas(model).values())

    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8
    # Step 1 runs with theta = 0: exactly the base model's answer NLL, computed here without TRL.
    assert losses[0] == pytest.approx(_reference_loss(tiny_llama_dir, rows), abs=1e-4)
    # Same batch every step: the loss falls at every step (a random tiny model with 1,024 trainable values).
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.2, losses

    for name, value in model.named_parameters():
        if "neuroada_" not in name:
            assert torch.equal(value, base_before[name]), f"base weight {name} changed"
    assert all(torch.equal(b, indices_before[n]) for n, b in model.named_buffers() if "neuroada_indices" in n)
    thetas = _thetas(model)
    assert len(thetas) == 2 * 7 and all(t.abs().sum() > 0 for t in thetas.values())
    # The selected connections are the top-|W| input of every row (independent reference).
    for name, idx in indices_before.items():
        weight = dict(model.named_parameters())[name.replace("neuroada_indices.default", "base_layer.weight")]
        assert torch.equal(idx[:, 0], weight.abs().argmax(dim=1))

    out = tmp_path / "adapter"
    trainer.save_model(out)
    saved = load_file(out / "adapter_model.safetensors")
    kinds = ["neuroada_fingerprint", "neuroada_indices", "neuroada_theta"]
    assert len(saved) == 42 and sorted({k.split(".")[-1] for k in saved}) == kinds
    assert sum(t.numel() for k, t in saved.items() if "theta" in k) == sum(t.numel() for t in thetas.values())
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "NEUROADA"

    ids = torch.tensor([[1, 523, 9861, 30, 2, 17, 42, 4096]])
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, out).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(input_ids=ids).logits, trained_logits)


def test_sft_gradient_checkpointing_gives_the_same_training(tiny_llama_dir, tmp_path):
    plain = _trainer(tiny_llama_dir, _config(tmp_path / "a", max_steps=3))
    plain.train()
    checkpointed = _trainer(tiny_llama_dir, _config(tmp_path / "b", max_steps=3, gradient_checkpointing=True))
    checkpointed.train()
    assert _losses(checkpointed) == pytest.approx(_losses(plain), abs=1e-5)
    for name, theta in _thetas(plain.model).items():
        torch.testing.assert_close(_thetas(checkpointed.model)[name], theta, rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_restores_adapter_and_optimizer(tiny_llama_dir, tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    full = _trainer(tiny_llama_dir, _config(tmp_path / "full", **args))
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }

    resumed = _trainer(tiny_llama_dir, _config(tmp_path / "resumed", **args))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert len(_losses(resumed, after_step=2)) == 2  # steps 3-4 ran here; 1-2 come from the checkpoint
    assert _losses(resumed, after_step=2) == pytest.approx(_losses(full, after_step=2), abs=1e-6)
    for name, theta in _thetas(full.model).items():
        torch.testing.assert_close(_thetas(resumed.model)[name], theta, rtol=0, atol=1e-7)

    # Control: without the optimizer state (Adam moments) the continuation differs, so the
    # comparison above really depends on it.
    stripped = tmp_path / "stripped"
    shutil.copytree(checkpoint, stripped)
    (stripped / "optimizer.pt").unlink()
    fresh_optimizer = _trainer(tiny_llama_dir, _config(tmp_path / "fresh", **args))
    fresh_optimizer.train(resume_from_checkpoint=str(stripped))
    differences = [(_thetas(fresh_optimizer.model)[n] - t).abs().max().item() for n, t in _thetas(full.model).items()]
    assert max(differences) > 1e-3


def _chat_template_source(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A tokenizer folder whose chat template uses two special tokens the model's tokenizer lacks."""
    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>", "<|endturn|>"]})
    source.chat_template = (
        "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|endturn|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
    )
    source.eos_token = "<|endturn|>"
    path = tmp_path / "template-source"
    source.save_pretrained(path)
    return path


def test_sft_with_tokens_added_by_trl(tiny_llama_dir, tmp_path):
    """TRL's clone_chat_template adds tokens and writes trainable_token_indices / modules_to_save."""
    source = _chat_template_source(tmp_path, tiny_llama_dir)
    config = NeuroAdaConfig()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    old_vocab = model.get_input_embeddings().weight.shape[0]
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path / "out", max_steps=3, chat_template_path=str(source)),
        train_dataset=Dataset.from_list(_rows()),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
        peft_config=config,
    )
    tokenizer = trainer.processing_class
    new_ids = tokenizer.convert_tokens_to_ids(["<|turn|>", "<|endturn|>"])
    assert new_ids == [old_vocab, old_vocab + 1]
    # TRL rounds the vocabulary up to a multiple of 64 with dummy tokens; all added rows train.
    new_vocab = trainer.model.get_base_model().get_output_embeddings().weight.shape[0]
    assert new_vocab == 49216
    assert config.trainable_token_indices == {"embed_tokens": list(range(old_vocab, new_vocab))}
    assert config.modules_to_save == ["lm_head"]

    peft_model = trainer.model
    embedding = peft_model.get_input_embeddings()
    prompt = tokenizer.apply_chat_template(_rows(1)[0]["prompt"], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    assert set(new_ids) <= set(ids[0].tolist())
    old_ids = torch.arange(0, old_vocab, 997)
    with torch.no_grad():
        new_rows_before, old_rows_before = embedding(torch.tensor(new_ids)).clone(), embedding(old_ids).clone()
        lm_head_before = peft_model.get_base_model().get_output_embeddings().weight.clone()
    trainer.train()
    assert len(_losses(trainer)) == 3
    with torch.no_grad():
        assert not torch.allclose(embedding(torch.tensor(new_ids)), new_rows_before)  # the added tokens learn
        assert torch.equal(embedding(old_ids), old_rows_before)  # every other row stays frozen
        assert not torch.equal(peft_model.get_base_model().get_output_embeddings().weight, lm_head_before)

    out = tmp_path / "adapter"
    trainer.save_model(out)
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        base.resize_token_embeddings(new_vocab)
        reloaded = PeftModel.from_pretrained(base, out).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)


def test_sft_example_script_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """examples/trl/sft.py on the tiny model: its numbers agree with an independent evaluation."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "trl"))
    sys.modules.pop("sft", None)
    import sft  # noqa: PLC0415

    from harness.method_args import method_arguments
    from harness.safe_args import safe_arguments
    from harness.training import CommonsenseArguments

    data = CommonsenseArguments(
        model_name_or_path=str(tiny_llama_dir), dtype="float32", sources="csqa,piqa", train_size=8, eval_size=6
    )
    settings = dict(sft.DEFAULTS, output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4)
    settings["disable_tqdm"] = True
    # --safe --safe_freeze_end_steps 1 --safe_max_threshold 1: SAFE checks after step 1 and freezes one of 2 blocks
    safe = safe_arguments()(safe=True, safe_warmup_steps=0, safe_freeze_end_steps=1, safe_max_threshold=1.0)
    sft.main(data, method_arguments("neuroada")(), safe, SFTConfig(**settings))
    printed = capsys.readouterr().out
    assert "[SAFE] step 1: froze base_model.model.model.layers." in printed

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    heldout = cs.make_splits(cs.load_questions("csqa,piqa")).heldout[:6]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = cs.evaluate_multiple_choice(base, tokenizer, heldout)
    tuned = PeftModel.from_pretrained(base, tmp_path / "out")
    after = cs.evaluate_multiple_choice(tuned, tokenizer, heldout)
    expected_trainable = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert f"[before] held-out {before.summary()}" in printed
    assert f"[after] held-out {after.summary()}" in printed
    assert cs.paired_change(before, after).summary() in printed
    assert f"trainable params: {expected_trainable:,}" in printed  # PEFT's count when the trainer starts
    assert f"trainable parameters: {expected_trainable // 2:,} of" in printed  # at the end: one block frozen
    assert f"adapter saved to: {(tmp_path / 'out').resolve()}" in printed


def test_merged_evaluation_matches_the_adapter_and_restores_weights(tiny_llama_dir):
    """harness.training.evaluate merges float32 adapters for speed: same scores, weights restored bit for bit."""
    from peft import get_peft_model

    from harness.training import merged_for_inference

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, NeuroAdaConfig(init_weights=False))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    questions = cs.make_splits(cs.load_questions("csqa,piqa")).heldout[:5]
    unmerged = cs.evaluate_multiple_choice(model, tokenizer, questions)
    with merged_for_inference(model):
        assert all(layer.merged for layer in model.modules() if hasattr(layer, "neuroada_theta"))
        merged = cs.evaluate_multiple_choice(model, tokenizer, questions)
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "neuroada_theta"))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for a, b in zip(merged.scores, unmerged.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert merged.predictions == unmerged.predictions
