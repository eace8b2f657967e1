"""TRL SFTTrainer + NeuroAdaConfig on a 4-bit (NF4) tiny Llama, QLoRA-style, on the CPU.

``prepare_model_for_kbit_training`` with gradient checkpointing, then a few SFT steps; checked
against references: the quantized base bytes and every non-adapter weight are unchanged, only
theta moved, the indices are the top-|W| of the dequantized weights, gradient checkpointing gives
the same theta gradients as a plain backward, and the trained adapter lowers the loss it trained on.
DPOTrainer: the reference is the quantized policy with the adapter disabled (first loss exactly ln 2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig, NeuroAdaLayer
from neuroada_plugin.kit.bnb_cpu_layout import is_packed_for_cpu, standard_4bit_state
from neuroada_plugin.kit.quantized import dequantize_weight
from neuroada_plugin.neuroada.bnb import Linear4bit

from bnb_layouts import LAYOUTS, keep_standard_layout, linear4bit_layers, standard_bytes

ROOT = Path(__file__).resolve().parent.parent


def _load_4bit(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )


def _batch_loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def _block_scales(param: torch.Tensor) -> torch.Tensor | None:
    """The block scales of a 4-bit weight in the standard layout (double-quantized: their 8-bit codes)."""
    if not isinstance(param, bnb.nn.Params4bit):
        return None
    return standard_4bit_state(param)[1].absmax.clone()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sft_trains_neuroada_on_a_4bit_base_with_gradient_checkpointing(tiny_llama_dir, tmp_path, layout):
    """``packed``: the eval forward that measures the loss before training packs every 4-bit layer (on CPUs with
    AVX512-BF16), and training must then run on the weights as loaded, with gradients through every layer."""
    model = _load_4bit(tiny_llama_dir)
    if layout == "standard":
        keep_standard_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    frozen_before = {n: (standard_bytes(p).clone(), _block_scales(p)) for n, p in model.named_parameters()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:2])
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=2,  # = the dataset: every step sees the same batch
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=True,
        bf16=False,
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=NeuroAdaConfig(top_k=2),
    )
    peft_model = trainer.model
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, NeuroAdaLayer)}
    assert len(layers) == 14 and all(isinstance(m, Linear4bit) for m in layers.values())
    assert peft_model.base_model.model.is_gradient_checkpointing

    # Selection == per-row top-|W| of the dequantized NF4 weight.
    for name, layer in layers.items():
        magnitude = dequantize_weight(layer.base_layer).float().abs()
        chosen = magnitude.gather(1, layer.neuroada_indices["default"]).sort(dim=1, descending=True).values
        assert torch.equal(chosen, magnitude.topk(2, dim=1).values), name

    # Gradient checkpointing changes nothing in theta's gradient (same batch, with and without).
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    for layer in layers.values():
        with torch.no_grad():
            layer.neuroada_theta["default"].normal_(0, 0.01)
    peft_model.train()
    grads = []
    for checkpointing in (True, False):
        if checkpointing:
            peft_model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            peft_model.base_model.model.gradient_checkpointing_disable()
        peft_model.zero_grad()
        _batch_loss(peft_model, batch).backward()
        grads.append({n: m.neuroada_theta["default"].grad.clone() for n, m in layers.items()})
    for name in layers:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    peft_model.zero_grad()
    for layer in layers.values():
        with torch.no_grad():
            layer.neuroada_theta["default"].zero_()

    peft_model.eval()
    with torch.no_grad():
        loss_before = _batch_loss(peft_model, batch).item()
    packed = [is_packed_for_cpu(m.weight) for m in linear4bit_layers(peft_model)]
    assert len(packed) == 14 and all(p == (layout == "packed") for p in packed)
    trainer.train()
    peft_model.eval()
    with torch.no_grad():
        loss_after = _batch_loss(peft_model, batch).item()
    print(f"4-bit SFT loss on the training batch: {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)

    # Only theta moved; the 4-bit codes and block scales (read in the standard layout: the eval forward above
    # packed them again where the CPU does) and every other weight are exactly as loaded.
    for name, param in peft_model.named_parameters():
        if "neuroada_theta" in name:
            assert param.requires_grad and torch.count_nonzero(param) > 0.9 * param.numel(), name
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert not param.requires_grad, name
        codes, scales = frozen_before[key]
        assert torch.equal(standard_bytes(param), codes), name
        if scales is not None:
            assert torch.equal(_block_scales(param), scales), name

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_sft_example_script_with_load_in_4bit_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """examples/trl/sft.py --load_in_4bit on the tiny model: a 4-bit base, and its printed scores agree with an
    independent evaluation of a fresh 4-bit base with and without the saved adapter (never merged into 4-bit)."""
    import warnings

    from peft import PeftModel

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "trl"))
    sys.modules.pop("sft", None)
    import sft  # noqa: PLC0415

    from harness.method_args import method_arguments
    from harness.safe_args import safe_arguments
    from harness.training import CommonsenseArguments, load_model_and_tokenizer

    data = CommonsenseArguments(
        model_name_or_path=str(tiny_llama_dir), sources="csqa,piqa", train_size=8, eval_size=6, load_in_4bit=True
    )
    model, _ = load_model_and_tokenizer(data)
    assert model.is_loaded_in_4bit and model.is_gradient_checkpointing  # prepare_model_for_kbit_training
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")} == {"Linear4bit"}
    del model

    settings = dict(sft.DEFAULTS, output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4)
    settings["disable_tqdm"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft.main(data, method_arguments("neuroada")(), safe_arguments()(), SFTConfig(**settings))
    # The evaluation never merges into the 4-bit model (that would re-quantize and round).
    assert not [w for w in caught if "re-quantized" in str(w.message)]
    printed = capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    heldout = cs.make_splits(cs.load_questions("csqa,piqa")).heldout[:6]
    base = _load_4bit(tiny_llama_dir)
    before = cs.evaluate_multiple_choice(base, tokenizer, heldout)
    tuned = PeftModel.from_pretrained(base, tmp_path / "out")
    assert all(isinstance(m, Linear4bit) for m in tuned.modules() if isinstance(m, NeuroAdaLayer))
    after = cs.evaluate_multiple_choice(tuned, tokenizer, heldout)
    assert f"[before] held-out {before.summary()}" in printed
    assert f"[after] held-out {after.summary()}" in printed


def test_dpo_trains_neuroada_on_a_4bit_base_with_the_disabled_adapter_as_reference(tiny_llama_dir, tmp_path):
    model = prepare_model_for_kbit_training(_load_4bit(tiny_llama_dir), use_gradient_checkpointing=True)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    questions = cs.make_splits(cs.load_source("obqa")).train[:2]  # the same batch every step
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=5e-2,
            beta=0.1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=True,
            bf16=False,
            max_length=128,
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
        peft_config=NeuroAdaConfig(),
    )
    assert trainer.ref_model is None  # reference = the quantized policy with the adapter disabled
    layers = [m for m in trainer.model.modules() if isinstance(m, NeuroAdaLayer)]
    assert len(layers) == 14 and all(isinstance(m, Linear4bit) for m in layers)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    # Step 1: theta = 0, policy == reference exactly (same quantized matmuls): loss = ln 2, margin 0.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert logs[2]["loss"] < math.log(2) - 1e-3 and logs[2]["rewards/margins"] > 0
    for name, param in trainer.model.named_parameters():
        if "neuroada_theta" in name:
            assert param.abs().sum() > 0, name
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param.detach(), frozen_before[key]), name
