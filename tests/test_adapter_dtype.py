"""The adapter dtype a config asks for is the dtype that trains and is saved, also after TRL's QLoRA bf16 cast.

TRL 1.16's DPO/KTO/SFT/GRPO trainers cast every trainable parameter of a 4-bit/8-bit model to bf16
after building the PeftModel. The kit records each float32 adapter tensor on quantized bases and
restores it (kit/adapter_dtype.py). References: the values before the cast (bit for bit), and a
TRL run whose cast was undone by hand before training with the plugin's restore switched off.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig, restore_adapter_dtypes
from neuroada_plugin.kit import adapter_dtype, layer

from bnb_layouts import keep_standard_layout


def _load_4bit(model_dir):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    keep_standard_layout(model)  # the same 4-bit kernels on every CPU (bit-exact comparisons below)
    return model


def _trl_cast(model) -> None:
    """What TRL 1.16 does to a quantized PeftModel (dpo_trainer.py, kto_trainer.py, sft_trainer.py, grpo)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)


def _thetas(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "neuroada_theta" in n}


@pytest.fixture
def random_theta_model(tiny_llama_dir):
    """A 4-bit tiny Llama with a NeuroAda adapter whose theta is random (not bf16-representable) float32."""
    model = get_peft_model(_load_4bit(tiny_llama_dir), NeuroAdaConfig(top_k=2, init_weights=False))
    made = {n: p.detach().clone() for n, p in _thetas(model).items()}
    assert made and all(t.dtype == torch.float32 for t in made.values())
    assert any(not torch.equal(t.to(torch.bfloat16).float(), t) for t in made.values())
    return model, made


def test_the_first_forward_after_the_cast_restores_theta_bit_for_bit(random_theta_model):
    model, made = random_theta_model
    _trl_cast(model)
    assert all(p.dtype == torch.bfloat16 for p in _thetas(model).values())
    with pytest.warns(UserWarning, match="back in the dtype the adapter config chose"):
        adapter_dtype._warned.discard("restored")
        model(input_ids=torch.tensor([[1, 2, 3]]))
    for name, param in _thetas(model).items():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), made[name]), name
        assert param.requires_grad, name


def test_saving_before_any_forward_writes_the_config_dtype(random_theta_model, tmp_path):
    model, made = random_theta_model
    _trl_cast(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    thetas = {k: v for k, v in saved.items() if "neuroada_theta" in k}
    assert len(thetas) == len(made)
    for key, value in thetas.items():
        assert value.dtype == torch.float32 and torch.equal(value, made[f"{key}.default"]), key


def test_a_float32_checkpoint_loads_without_rounding_into_a_cast_model(random_theta_model, tiny_llama_dir, tmp_path):
    """Resume: the Trainer loads the checkpoint into the model TRL already cast; nothing may round through bf16."""
    model, made = random_theta_model
    model.save_pretrained(tmp_path)
    fresh = get_peft_model(_load_4bit(tiny_llama_dir), NeuroAdaConfig(top_k=2))
    _trl_cast(fresh)
    fresh.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    for name, param in _thetas(fresh).items():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), made[name]), name


def test_bf16_asked_for_is_left_alone_and_full_precision_bases_are_not_touched(tiny_llama_dir):
    pinned = get_peft_model(_load_4bit(tiny_llama_dir), NeuroAdaConfig(top_k=2, theta_dtype="bfloat16"))
    assert restore_adapter_dtypes(pinned) == 0
    assert all(p.dtype == torch.bfloat16 for p in _thetas(pinned).values())

    plain = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), NeuroAdaConfig(top_k=2)
    )
    _trl_cast(plain)  # a deliberate cast of a full-precision model (no trainer does this): not ours to undo
    assert restore_adapter_dtypes(plain) == 0
    assert all(p.dtype == torch.bfloat16 for p in _thetas(plain).values())


def test_under_a_multi_process_group_the_forward_warns_instead_of_changing_dtypes(random_theta_model, monkeypatch):
    model, made = random_theta_model
    _trl_cast(model)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    adapter_dtype._warned.clear()
    with pytest.warns(UserWarning, match=r"restore_adapter_dtypes\(trainer.model\) before trainer.train\(\)"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(p.dtype == torch.bfloat16 for p in _thetas(model).values())
    # Called before the trainer wraps the model (what the Axolotl plugin does): restored exactly.
    assert restore_adapter_dtypes(model) == len(made)
    for name, param in _thetas(model).items():
        assert torch.equal(param.detach(), made[name]), name


# ----------------------------------------------------------------------------------------------------------------
# TRL's DPO and KTO trainers on a 4-bit base
# ----------------------------------------------------------------------------------------------------------------


def _rows(kind: str) -> list[dict]:
    pairs = cs.dpo_rows(cs.make_splits(cs.load_source("obqa")).train[:2])
    if kind == "dpo":
        return pairs
    return [
        {"prompt": row["prompt"], "completion": row[answer], "label": answer == "chosen"}
        for row in pairs
        for answer in ("chosen", "rejected")
    ]


def _train(kind: str, model_dir, out, theta_dtype: str | None, undo_cast_by_hand: bool = False):
    model = prepare_model_for_kbit_training(_load_4bit(model_dir), use_gradient_checkpointing=False)
    common = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4 if kind == "kto" else 2,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )
    trainer_class, args = (DPOTrainer, DPOConfig(**common)) if kind == "dpo" else (KTOTrainer, KTOConfig(**common))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_rows(kind)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=NeuroAdaConfig(top_k=2, theta_dtype=theta_dtype),
    )
    cast_to = {p.dtype for p in _thetas(trainer.model).values()}
    if undo_cast_by_hand:
        for param in _thetas(trainer.model).values():
            param.data = param.data.float()  # zero-initialised theta: exact
    trainer.train()
    trainer.save_model(str(out))
    return trainer, cast_to


@pytest.mark.parametrize("kind", ["dpo", "kto"])
@pytest.mark.parametrize("theta_dtype", [None, "float32", "bfloat16"])
def test_trl_on_a_4bit_base_trains_and_saves_the_theta_dtype_asked_for(
    kind, theta_dtype, tiny_llama_dir, tmp_path, monkeypatch
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, cast_to = _train(kind, tiny_llama_dir, tmp_path / "run", theta_dtype)
    assert cast_to == {torch.bfloat16}  # TRL did cast: the test exercises the restore
    expected = torch.bfloat16 if theta_dtype == "bfloat16" else torch.float32
    thetas = _thetas(trainer.model)
    assert {p.dtype for p in thetas.values()} == {expected}
    assert all(p.abs().sum() > 0 for p in thetas.values())  # it trained
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert {v.dtype for k, v in saved.items() if "neuroada_theta" in k} == {expected}
    recorded = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["theta_dtype"]
    assert recorded == theta_dtype  # None: PEFT's autocast, documented as float32
    if expected == torch.bfloat16:
        return
    # Reference: TRL with the plugin's restore switched off and the cast undone by hand before training.
    monkeypatch.setattr(layer, "restore_layer_dtypes", lambda module: [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, _ = _train(kind, tiny_llama_dir, tmp_path / "reference", theta_dtype, undo_cast_by_hand=True)
    expected_values = _thetas(reference.model)
    for name, param in thetas.items():
        assert torch.equal(param.detach(), expected_values[name].detach()), name
    loaded = PeftModel.from_pretrained(_load_4bit(tiny_llama_dir), tmp_path / "run")
    for name, param in _thetas(loaded).items():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), thetas[name].detach()), name
