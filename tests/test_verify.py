"""``neuroada-plugin verify`` as a checker a user can trust: bad input is exit 2 with a message (never a traceback),
a checkpoint merged in another dtype is compared with the merge in that dtype, and mismatches are named by kind.

The half-precision checkpoints are made as ``axolotl merge-lora`` makes them (Axolotl's ``bf16: auto`` turned
into ``fp16: true`` on a CPU): the base loaded in that dtype, the adapter attached with PEFT,
``merge_and_unload()``, ``save_pretrained``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeuroAdaConfig
from neuroada_plugin.cli import main as plugin_main

from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def bf16_base_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    tiny_llama(seed=1, dtype=torch.bfloat16, vocab_size=1000).save_pretrained(root / "base")
    config = NeuroAdaConfig(top_k=2, init_weights=False)
    get_peft_model(tiny_llama(seed=1, vocab_size=1000), config).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _merge_like_axolotl(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


def _verify(base: Path, adapter: Path, merged: Path, capsys) -> tuple[int, str, str]:
    code = plugin_main(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged), "-q"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, " ".join(captured.err.split())  # messages are wrapped at 110 columns


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_merge_is_compared_in_its_own_dtype(bf16_base_and_adapter, tmp_path, capsys, dtype):
    base, adapter = bf16_base_and_adapter
    merged = _merge_like_axolotl(base, adapter, tmp_path / "merged", dtype)
    assert {t.dtype for t in load_file(merged / "model.safetensors").values()} == {dtype}
    code, out, _ = _verify(base, adapter, merged, capsys)
    name = str(dtype).removeprefix("torch.")
    assert code == 0 and f"weights bit-identical to merge_and_unload in {name} (21 tensors)" in out


def test_a_tensor_stored_in_another_dtype_is_named_as_such(bf16_base_and_adapter, tmp_path, capsys):
    base, adapter = bf16_base_and_adapter
    merged = _merge_like_axolotl(base, adapter, tmp_path / "merged", torch.float16)
    tensors = load_file(merged / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] += 1
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _verify(base, adapter, merged, capsys)
    assert code == 1
    assert "1 of 21 tensors have other values than PEFT's in-memory merge in float16: model.layers.0.mlp.up_proj" in err
    assert "1 tensors are stored in another dtype" in err and "model.norm.weight float32 vs float16" in err


def test_bad_input_is_exit_2_with_a_message(bf16_base_and_adapter, tmp_path, capsys):
    base, adapter = bf16_base_and_adapter
    merged = _merge_like_axolotl(base, adapter, tmp_path / "merged", torch.bfloat16)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _verify(base, adapter, empty, capsys)
    assert code == 2 and f"Merged checkpoint folder {empty} has no config.json" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = _verify(base, truncated, merged, capsys)
    assert code == 2 and "adapter_model.safetensors: truncated" in err

    other = tmp_path / "other-base"
    tiny_llama(seed=1, vocab_size=1000, intermediate_size=96).save_pretrained(other)
    code, _, err = _verify(other, adapter, merged, capsys)
    assert code == 2 and "trained on a different base model" in err and "down_proj" in err

    code, _, err = _verify(base, tmp_path / "missing", merged, capsys)
    assert code == 2 and "does not exist" in err
