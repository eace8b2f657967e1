"""Axolotl validation of multi-GPU configurations with `adapter: neuroada` (runs in .venv-axolotl).

ZeRO-2/3 and FSDP (incl. ``cpu_ram_efficient_loading``) are accepted now that creation and merging work on
sharded models (tests/test_distributed_zero3.py, tests/test_distributed_ddp_fsdp.py); refused are ZeRO-3
without gathering the weights on save (the adapter file would be empty) and sharded loading for a method
whose spec does not say ``supports_sharding``. The shipped example configs are checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
AXOLOTL_PYTHON = REPO / ".venv-axolotl" / "bin" / "python"

_SCRIPT = r"""
import dataclasses, json, sys
from neuroada_plugin.integrations.axolotl.validation import check_raw_config
from neuroada_plugin.registry import get_method
from axolotl.cli.config import load_cfg

cases, configs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
spec = get_method("neuroada")
unsharded = dataclasses.replace(spec, supports_sharding=False)  # a method that cannot gather
results = {}
for name, (which, data) in cases.items():
    try:
        chosen = {"spec": spec, "unsharded": unsharded, "neat": get_method("neat"), "smoa": get_method("smoa")}[which]
        check_raw_config(chosen, data)
        results[name] = "ok"
    except ValueError as error:
        results[name] = f"refused: {error}"
for name, path in configs.items():
    try:
        cfg = load_cfg(path)
        results[name] = f"ok fsdp_version={cfg.fsdp_version} ram_efficient={cfg.fsdp_config.cpu_ram_efficient_loading}"
    except Exception as error:  # noqa: BLE001
        results[name] = f"refused: {type(error).__name__}: {error}"
print("RESULTS" + json.dumps(results))
"""

ZERO3 = str(REPO / "axolotl_configs" / "deepspeed" / "zero3.json")
ZERO2 = str(REPO / "axolotl_configs" / "deepspeed" / "zero2.json")
CASES = {
    "zero3_file": ("spec", {"adapter": "neuroada", "deepspeed": ZERO3}),
    "zero2_file": ("spec", {"adapter": "neuroada", "deepspeed": ZERO2}),
    "zero3_inline_gathers": (
        "spec",
        {
            "adapter": "neuroada",
            "deepspeed": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}},
        },
    ),
    "zero3_inline_no_gather": ("spec", {"adapter": "neuroada", "deepspeed": {"zero_optimization": {"stage": 3}}}),
    "fsdp_ram_efficient": (
        "spec",
        {"adapter": "neuroada", "fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}},
    ),
    "unsharded_zero3": ("unsharded", {"adapter": "neuroada", "deepspeed": ZERO3}),
    "unsharded_ram_efficient": (
        "unsharded",
        {"adapter": "neuroada", "fsdp_config": {"cpu_ram_efficient_loading": True}},
    ),
    "unsharded_zero2": ("unsharded", {"adapter": "neuroada", "deepspeed": ZERO2}),
    # NEAT reads the whole frozen weight in every forward, gathering it under ZeRO-3 (supports_sharding): accepted.
    "neat_zero3": ("neat", {"adapter": "neat", "deepspeed": ZERO3}),
    # SMoA reads it in every forward without gathering (reads_weights_in_forward, no supports_sharding): refused.
    "smoa_zero3": ("smoa", {"adapter": "smoa", "deepspeed": ZERO3}),
    "neat_zero2": ("neat", {"adapter": "neat", "deepspeed": ZERO2}),
    "neat_fsdp_ram_efficient": (
        "neat",
        {"adapter": "neat", "fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}},
    ),
    # A 4-bit base (FSDP-QLoRA, ZeRO-3 QLoRA): FSDP2 and ZeRO-3 train (tests/test_distributed_qlora.py); FSDP1
    # cannot flatten 4-bit storage beside float32 theta; RAM-efficient loading of a quantized base is untested.
    "fsdp2_4bit": ("spec", {"adapter": "neuroada", "load_in_4bit": True, "fsdp_version": 2, "fsdp_config": {}}),
    "zero3_4bit": ("spec", {"adapter": "neuroada", "load_in_4bit": True, "deepspeed": ZERO3}),
    "zero3_8bit": ("spec", {"adapter": "neuroada", "load_in_8bit": True, "deepspeed": ZERO3}),
    # NEAT on a 4-bit base reads the dequantized weight (gathered under ZeRO-3): FSDP-QLoRA and ZeRO-3 + 4-bit.
    "neat_fsdp2_4bit": ("neat", {"adapter": "neat", "load_in_4bit": True, "fsdp_version": 2, "fsdp_config": {}}),
    "neat_zero3_4bit": ("neat", {"adapter": "neat", "load_in_4bit": True, "deepspeed": ZERO3}),
    # SMoA reads the exact weight: a quantized base is refused.
    "smoa_4bit": ("smoa", {"adapter": "smoa", "load_in_4bit": True}),
    "fsdp2_8bit": ("spec", {"adapter": "neuroada", "load_in_8bit": True, "fsdp_version": 2, "fsdp_config": {}}),
    "fsdp1_4bit": (
        "spec",
        {"adapter": "neuroada", "load_in_4bit": True, "fsdp_config": {"reshard_after_forward": True}},
    ),
    "fsdp1_list_8bit": ("spec", {"adapter": "neuroada", "load_in_8bit": True, "fsdp": ["full_shard", "auto_wrap"]}),
    "fsdp2_4bit_ram_efficient": (
        "spec",
        {
            "adapter": "neuroada",
            "load_in_4bit": True,
            "fsdp_version": 2,
            "fsdp_config": {"cpu_ram_efficient_loading": True},
        },
    ),
}


def _run(cases: dict, configs: dict, cwd: Path) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
    }
    env.pop("NEUROADA_PLUGIN_METHODS", None)
    done = subprocess.run(
        [str(AXOLOTL_PYTHON), "-c", _SCRIPT, json.dumps(cases), json.dumps(configs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0 and "RESULTS" in done.stdout, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])


def test_multi_gpu_configurations(tmp_path, tiny_llama_dir):
    # The shipped FSDP2 example (RAM-efficient loading) through axolotl's own config loading, on the tiny model.
    example = yaml.safe_load((REPO / "axolotl_configs" / "multi_gpu" / "sft_smollm2_fsdp.yml").read_text())
    example.update(
        base_model=str(tiny_llama_dir),
        tokenizer_config=str(tiny_llama_dir),
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    example["datasets"][0]["path"] = str(tmp_path / "train.jsonl")
    (tmp_path / "fsdp.yml").write_text(yaml.safe_dump(example))
    results = _run(CASES, {"fsdp_example": str(tmp_path / "fsdp.yml")}, tmp_path)

    for name in (
        "zero3_file",
        "zero2_file",
        "zero3_inline_gathers",
        "fsdp_ram_efficient",
        "unsharded_zero2",
        "neat_zero2",
        "neat_zero3",
        "neat_fsdp_ram_efficient",
        "fsdp2_4bit",
        "zero3_4bit",
        "zero3_8bit",
        "neat_fsdp2_4bit",
        "neat_zero3_4bit",
    ):
        assert results[name] == "ok", (name, results[name])
    assert "load_in_4bit" in results["smoa_4bit"] and results["smoa_4bit"].startswith("refused"), results["smoa_4bit"]
    for name in ("fsdp1_4bit", "fsdp1_list_8bit"):
        assert results[name].startswith("refused: FSDP1 (`fsdp_version: 1`) with a quantized base"), results[name]
        assert "Set `fsdp_version: 2`" in results[name], results[name]
    assert (
        "cpu_ram_efficient_loading: true` with a quantized base (load_in_4bit: true)"
        in results["fsdp2_4bit_ram_efficient"]
    )
    assert results["fsdp_example"] == "ok fsdp_version=2 ram_efficient=True", results["fsdp_example"]
    assert "stage3_gather_16bit_weights_on_model_save: true" in results["zero3_inline_no_gather"]
    assert "empty" in results["zero3_inline_no_gather"]
    assert "cannot gather them" in results["unsharded_zero3"]
    assert "cpu_ram_efficient_loading: true" in results["unsharded_ram_efficient"]
    assert "reads the full weights when the adapter is created" in results["smoa_zero3"], results["smoa_zero3"]


def test_example_configs_name_existing_files():
    zero3 = yaml.safe_load((REPO / "axolotl_configs" / "multi_gpu" / "sft_smollm2_zero3.yml").read_text())
    assert (REPO / zero3["deepspeed"]).is_file()
    config = json.loads((REPO / zero3["deepspeed"]).read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["adapter"] == "neuroada"
