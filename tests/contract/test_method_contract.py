"""The contract every registered method meets, run unchanged over the registry (the toy method included).

Generic behaviour only: PEFT registration, save/load in a fresh process without importing the
plugin, forward == merged forward, exact unmerge, disable, several adapters, adapter dtypes
against PEFT's LoRA, the streaming merge against PEFT's in-memory merge, and the Axolotl
plugin offering the method. Each method's math is tested against dense references in its
own tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.merge import UnsupportedAdapterError, merge_adapter_checkpoint
from neuroada_plugin.registry import EXTRA_METHODS_ENV, MethodSpec, methods

CONTRACT_DIR = Path(__file__).resolve().parent
TOY_MODULE = "toy_method"  # tests/contract/toy_method: the test-only second method
REPO = CONTRACT_DIR.parent.parent
SPECS = list(methods().values())
IDS = [spec.name for spec in SPECS]
TARGETS = ["q_proj", "v_proj", "down_proj"]
TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 480], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_the_contract_covers_the_builtins_and_the_toy():
    assert {"neuroada", "neat", "toyrank", "toyplain"} <= set(IDS)
    assert any(spec.checkpoint_rule is None for spec in SPECS)  # a method without a merge rule passes too


def make_config(spec: MethodSpec, **overrides):
    return spec.data_free_config(target_modules=TARGETS, **overrides)


def load_base(model_dir: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def randomise(model: torch.nn.Module, spec: MethodSpec, adapter: str = "default", seed: int = 0) -> None:
    """Non-zero values in every adapter parameter, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if spec.prefix in name and name.endswith(f".{adapter}"):
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def adapted(model_dir: Path, spec: MethodSpec):
    model = get_peft_model(load_base(model_dir), make_config(spec))
    randomise(model, spec)
    return model


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_registered_with_peft(spec):
    peft_type = PeftType(spec.peft_type)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is spec.config_class()
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is spec.tuner_class()
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == spec.prefix
    assert make_config(spec).peft_type is peft_type


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_equals_merged_and_unmerge_restores(spec, tiny_llama_dir):
    model = adapted(tiny_llama_dir, spec)
    expected = logits(model)
    assert not torch.allclose(expected, logits(load_base(tiny_llama_dir)))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if spec.prefix not in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if spec.prefix not in name:
            if spec.exact_merge:
                assert torch.equal(param, weights[name]), f"{name} not restored bit for bit"
            else:
                torch.testing.assert_close(param, weights[name])
    plain = model.merge_and_unload()
    assert not any(spec.prefix in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_disable_gives_the_base_model(spec, tiny_llama_dir):
    model = adapted(tiny_llama_dir, spec)
    adapted_logits = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(load_base(tiny_llama_dir)))
    assert torch.equal(logits(model), adapted_logits)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_several_adapters(spec, tiny_llama_dir):
    model = adapted(tiny_llama_dir, spec)
    first = logits(model)
    model.add_adapter("other", make_config(spec))
    randomise(model, spec, "other", seed=1)
    assert torch.equal(logits(model), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and torch.equal(logits(model), first)
    assert not any(".other" in n for n in model.state_dict())


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_adapter_dtype_on_a_bf16_base_matches_lora(spec, autocast_adapter_dtype, tiny_llama_dir):
    dtypes = {}
    for prefix, config in ((spec.prefix, make_config(spec)), ("lora_", LoraConfig(target_modules=TARGETS))):
        model = get_peft_model(
            load_base(tiny_llama_dir, torch.bfloat16), config, autocast_adapter_dtype=autocast_adapter_dtype
        )
        dtypes[prefix] = {p.dtype for n, p in model.named_parameters() if prefix in n and p.is_floating_point()}
        assert logits(model).dtype == torch.bfloat16
    assert dtypes[spec.prefix] == dtypes["lora_"] == {torch.float32 if autocast_adapter_dtype else torch.bfloat16}


def _flags(model, prefix: str) -> set[tuple[str, torch.dtype, bool]]:
    """(adapter name, dtype, requires_grad) of every adapter tensor with ``prefix`` (LoRA's or the method's)."""
    return {(n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1], p.dtype, p.requires_grad)
            for n, p in model.named_parameters() if prefix in n and p.is_floating_point()}  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_inactive_and_loaded_adapters_on_a_bf16_base_stay_frozen_like_lora(spec, tiny_llama_dir, tmp_path):
    """PEFT casts adapter tensors on every entry point; a frozen adapter must stay frozen through it (as LoRA's)."""
    from peft import PeftModel

    seen = {}
    for prefix, make in (
        (spec.prefix, lambda: make_config(spec)),
        ("lora_", lambda: LoraConfig(target_modules=TARGETS)),
    ):
        model = get_peft_model(load_base(tiny_llama_dir, torch.bfloat16), make())
        model.add_adapter("second", make())  # inactive: frozen
        model.add_adapter("third", make(), autocast_adapter_dtype=False)
        model.save_pretrained(tmp_path / prefix)
        loaded = PeftModel.from_pretrained(load_base(tiny_llama_dir, torch.bfloat16), tmp_path / prefix)
        loaded.load_adapter(tmp_path / prefix, adapter_name="other")
        seen[prefix] = (_flags(model, prefix), _flags(loaded, prefix))
    assert seen[spec.prefix] == seen["lora_"]
    assert ("second", torch.float32, False) in seen["lora_"][0]  # the case that went wrong


_FRESH_PROCESS = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    out = model(torch.tensor(json.loads(sys.argv[3]))).logits
torch.save(out, sys.argv[4])
print("IMPORTED_BY_HOOK", "neuroada_plugin" in sys.modules)
"""


def fresh_process_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NEUROADA_PLUGIN_NO_AUTOLOAD", None)
    env["PYTHONPATH"] = os.pathsep.join([str(CONTRACT_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env[EXTRA_METHODS_ENV] = TOY_MODULE
    return env


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_saved_adapter_loads_in_a_fresh_process_without_import(spec, tiny_llama_dir, tmp_path):
    model = adapted(tiny_llama_dir, spec)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == spec.peft_type
    script = textwrap.dedent(_FRESH_PROCESS)
    args = [str(tiny_llama_dir), str(tmp_path / "adapter"), json.dumps(TOKENS.tolist()), str(tmp_path / "out.pt")]
    process = subprocess.run(
        [sys.executable, "-c", script, *args], env=fresh_process_env(), capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "IMPORTED_BY_HOOK True" in process.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(model))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_streaming_merge_equals_in_memory_merge(spec, tiny_llama_dir, tmp_path):
    model = adapted(tiny_llama_dir, spec)
    model.save_pretrained(tmp_path / "adapter")
    if spec.checkpoint_rule is None:  # refused clearly, with the way to merge it; nothing written
        code = plugin_main(
            ["merge", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"), "--output",
             str(tmp_path / "merged"), "-q"]
        )  # fmt: skip
        assert code == 2 and not (tmp_path / "merged").exists()
        with pytest.raises(
            UnsupportedAdapterError, match=rf"{spec.display_name}.*no streaming merge rule.*merge_and_unload"
        ):
            merge_adapter_checkpoint(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
        return
    merge_adapter_checkpoint(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    streamed = load_file(tmp_path / "merged" / "model.safetensors")
    tuner_layer = spec.tuner_class().tuner_layer_cls
    adapted_layers = {name.removeprefix("base_model.model.") for name, m in model.named_modules()
                      if isinstance(m, tuner_layer)}  # fmt: skip
    in_memory = model.merge_and_unload().state_dict()
    assert set(streamed) <= set(in_memory)
    changed = set()
    base = load_file(tiny_llama_dir / "model.safetensors")
    for name, tensor in streamed.items():
        assert torch.equal(tensor, in_memory[name]), f"{name}: streaming and in-memory merges differ"
        if not torch.equal(tensor, base[name]):
            changed.add(name.rsplit(".", 1)[0])  # a method may patch several tensors of a module (weight, bias)
    # Every layer the method adapted changed, and nothing else; a method may leave a targeted layer alone
    # (NeFT's global budget can select no neuron of it), but here at least one of each target is adapted.
    assert changed == adapted_layers
    assert {name.rsplit(".", 1)[1] for name in changed} == set(TARGETS)


# ------------------------------------------------------------------------------------------ Axolotl

AXOLOTL_PYTHON = REPO / ".venv-axolotl" / "bin" / "python"

_AXOLOTL_SCRIPT = """
import json, sys
import yaml
from axolotl.cli.config import load_cfg
from neuroada_plugin.integrations.axolotl import MethodsPlugin
from neuroada_plugin.integrations.axolotl.validation import axolotl_config_keys
from neuroada_plugin.registry import get_method
offered = [c.name for c in MethodsPlugin().get_adapter_capabilities()]
template, specs, folder = yaml.safe_load(open(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3]
results = {"offered": offered}
for name in specs:
    # a field Axolotl has no key of its own for, misspelt in the prefix (one letter dropped) and bare
    field = next(f.name for f in get_method(name).config_fields() if f.name not in axolotl_config_keys())
    results[f"{name}-field"] = field
    variants = (
        ("valid", {}),
        ("typo", {f"{name}_no_such_setting": 1}),
        ("prefix_typo", {f"{name[0]}{name[2:]}_{field}": 1}),
        ("bare", {field: 1}),
    )
    for variant, extra in variants:
        config = {k: v for k, v in template.items() if not k.startswith("neuroada_")}
        config.update(adapter=name, **{f"{name}_target_modules": ["q_proj", "v_proj"]}, **extra)
        path = f"{folder}/{name}-{variant}.yml"
        yaml.safe_dump(config, open(path, "w"))
        try:
            cfg = load_cfg(path)
            results[f"{name}-{variant}"] = {"ok": True, "merge_method": cfg.merge_method}
        except Exception as error:  # noqa: BLE001
            results[f"{name}-{variant}"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
print("RESULTS" + json.dumps(results))
"""


def test_axolotl_plugin_offers_and_validates_every_method(tiny_llama_dir, tmp_path):
    if not AXOLOTL_PYTHON.is_file():
        pytest.fail(f"{AXOLOTL_PYTHON} missing: create it with `bash scripts/setup_axolotl.sh`.", pytrace=False)
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 4
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    template = (REPO / "axolotl_configs" / "ci" / "tiny_sft.yml").read_text()
    import yaml

    config = yaml.safe_load(template)
    config.update(
        base_model=str(tiny_llama_dir),
        tokenizer_config=str(tiny_llama_dir),
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    config["datasets"][0]["path"] = str(data)
    (tmp_path / "template.yml").write_text(yaml.safe_dump(config))
    env = fresh_process_env()
    env.update(AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(CONTRACT_DIR)  # the main venv's paths must not leak into the axolotl venv
    process = subprocess.run(
        [str(AXOLOTL_PYTHON), "-c", _AXOLOTL_SCRIPT, str(tmp_path / "template.yml"), json.dumps(IDS), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0 and "RESULTS" in process.stdout, (process.stdout + process.stderr)[-4000:]
    results = json.loads(process.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])
    assert sorted(results["offered"]) == sorted(IDS)
    for name in IDS:
        assert results[f"{name}-valid"] == {"ok": True, "merge_method": "legacy"}, results[f"{name}-valid"]
        typo = results[f"{name}-typo"]
        assert not typo["ok"] and f"Unknown {name}_* key(s): `{name}_no_such_setting`" in typo["error"], typo
        # A misspelt prefix and a bare field name are refused too, naming the key to write instead.
        field = results[f"{name}-field"]
        misspelt = f"{name[0]}{name[2:]}_{field}"
        prefix_typo, bare = results[f"{name}-prefix_typo"], results[f"{name}-bare"]
        assert not prefix_typo["ok"], prefix_typo
        assert f"`{misspelt}` is not a key of Axolotl or of any adapter" in prefix_typo["error"], prefix_typo
        assert f"did you mean `{name}_{field}`? Write `{name}_{field}: 1` instead." in prefix_typo["error"], prefix_typo
        assert not bare["ok"] and f"`{field}` is not an Axolotl key" in bare["error"], bare
        assert f"did you mean `{name}_{field}`? Write `{name}_{field}: 1` instead." in bare["error"], bare
