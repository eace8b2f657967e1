"""NEAT -> LoRA export: the exported standard LoRA adapter (loaded by PEFT's own LoRA code) gives NEAT's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeuroAdaConfig
from neuroada_plugin.cli import main
from neuroada_plugin.neat import NeatConfig
from neuroada_plugin.neat.lora_export import model_to_lora

REPO = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 480], [1, 2, 3, 4, 5, 6, 7, 8]])


def neat_model(base_dir: Path, dtype: torch.dtype = torch.float32, **overrides):
    """A NEAT model with a non-zero update (random B) on the saved tiny Llama."""
    settings = dict(r=4, depth=1, act_fn="silu", scaling=0.5, target_modules=["q_proj", "v_proj", "down_proj"])
    settings.update(overrides)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return get_peft_model(base, NeatConfig(init_weights=False, **settings)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def lora_model(base_dir: Path, tensors: dict, config: dict, dtype: torch.dtype):
    """PEFT's LoRA (the independent implementation) with the exported factors."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    fields = {k: v for k, v in config.items() if k not in ("peft_type", "inference_mode")}
    model = get_peft_model(base, LoraConfig(**fields))
    result = set_peft_model_state_dict(model, tensors)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    return model.eval()


@pytest.mark.parametrize("depth", [0, 2])
def test_in_memory_export_is_exact_in_float64(tiny_llama_dir, depth):
    neat = neat_model(tiny_llama_dir, torch.float64, depth=depth)
    tensors, config = model_to_lora(neat)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    lora = lora_model(tiny_llama_dir, tensors, config, torch.float64)
    expected = logits(neat)
    with neat.disable_adapter():
        base = logits(neat)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs
    got = logits(lora)
    # the factors are computed in float32, so compare at float32 precision on float64 models
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the factor product is NEAT's dense update, layer by layer
    layer = neat.base_model.model.model.layers[0].self_attn.q_proj
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    product = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
    torch.testing.assert_close(product, layer.get_delta_weight("default").double(), rtol=1e-6, atol=1e-7)


def test_export_from_a_merged_model_uses_the_pre_merge_weight(tiny_llama_dir):
    neat = neat_model(tiny_llama_dir)
    before, _ = model_to_lora(neat)
    neat.merge_adapter()
    after, _ = model_to_lora(neat)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_layers_to_transform_exports_full_module_paths(tiny_llama_dir):
    neat = neat_model(tiny_llama_dir, layers_to_transform=[1], layers_pattern="layers")
    tensors, config = model_to_lora(neat)
    assert config["target_modules"] == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    lora = lora_model(tiny_llama_dir, tensors, config, torch.float32)
    adapted = {n for n, _ in lora.named_modules() if n.endswith("lora_A")}
    assert len(adapted) == 3 and all(".layers.1." in n for n in adapted)
    torch.testing.assert_close(logits(lora), logits(neat), rtol=1e-5, atol=1e-5)


def test_cli_export_loads_as_lora_with_neat_logits(tiny_llama_dir, tmp_path):
    neat = neat_model(tiny_llama_dir)
    neat.save_pretrained(tmp_path / "neat")
    out = tmp_path / "lora"
    code = main(["neat-to-lora", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path / "neat"), "-o", str(out)])
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 4, 0.0)
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == 2 * 3 * 2 and all(v.dtype == torch.float32 for v in saved.values())
    assert not list(tmp_path.glob(".lora.*"))  # no staging folder left
    # Loaded by plain PEFT (LoRA), in a process that never imports this package.
    script = f"""
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}), {str(out)!r}).eval()
assert type(model.peft_config["default"]).__name__ == "LoraConfig"
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor({TOKENS.tolist()})).logits, {str(tmp_path / "lora_logits.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "lora_logits.pt"), logits(neat), rtol=1e-5, atol=1e-5)

    # --dtype bfloat16 writes bf16 factors; the same output folder needs --force
    assert (
        main(
            [
                "neat-to-lora",
                "--base",
                str(tiny_llama_dir),
                "--adapter",
                str(tmp_path / "neat"),
                "-o",
                str(out),
                "--dtype",
                "bfloat16",
                "-q",
            ]
        )
        == 3
    )
    assert (
        main(
            [
                "neat-to-lora",
                "--base",
                str(tiny_llama_dir),
                "--adapter",
                str(tmp_path / "neat"),
                "-o",
                str(out),
                "--dtype",
                "bfloat16",
                "--force",
                "-q",
            ]
        )
        == 0
    )
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "adapter_model.safetensors").values())


def test_cli_refuses_bad_input_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    get_peft_model(base, NeuroAdaConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "neuroada")
    out = tmp_path / "lora"
    args = ["neat-to-lora", "--base", str(tiny_llama_dir), "-o", str(out), "--no-progress"]
    assert main([*args, "--adapter", str(tmp_path / "neuroada")]) == 2
    assert "peft_type is 'NEUROADA', not 'NEAT'" in " ".join(capsys.readouterr().err.split())

    # an adapter trained on another model: the layer and the base file are named
    from tiny_models import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", hidden_size=32)
    neat_model(other).save_pretrained(tmp_path / "neat-other")
    assert main([*args, "--adapter", str(tmp_path / "neat-other")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.layers.0.mlp.down_proj" in err and "output features" in err
    assert not out.exists() and not list(tmp_path.glob(".lora.*"))


def test_modules_to_save_are_carried_over(tiny_llama_dir, tmp_path):
    neat = neat_model(tiny_llama_dir, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        neat.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    tensors, config = model_to_lora(neat)
    assert config["modules_to_save"] == ["lm_head"]
    lora = lora_model(tiny_llama_dir, tensors, config, torch.float32)
    torch.testing.assert_close(logits(lora), logits(neat), rtol=1e-5, atol=1e-5)


def test_package_help_stays_light():
    """The subcommand's module is imported by ``neuroada-plugin --help``: it must not pull torch in."""
    code = "import sys, neuroada_plugin.neat.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
