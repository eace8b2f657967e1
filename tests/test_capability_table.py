"""The README's capability table is the registry's, and every cell is true.

* the table between the README's ``capability-table`` markers equals ``neuroada-plugin methods --table``;
* every "yes" cell names a test below (:data:`EVIDENCE`) that exists in this repository, and no other
  cell has one (a method whose "untested" capability gains a test must say "yes");
* every "no" cell is refused with a clear error when the configuration is read: the Axolotl validation
  for sharding and quantized bases, ``neuroada-plugin neat-to-lora`` for LoRA export.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuroada_plugin.capabilities import CAPABILITIES, capability_row, markdown_table
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.registry import methods

REPO = Path(__file__).resolve().parent.parent
AXOLOTL_PYTHON = REPO / ".venv-axolotl" / "bin" / "python"
# Methods this package ships (tests may register a toy method of their own in this process).
SHIPPED = [spec for spec in methods().values() if spec.config.startswith("neuroada_plugin.")]

_CONTRACT = "tests/contract/test_method_contract.py"
_EVERY_METHOD = {
    "peft": f"{_CONTRACT}::test_saved_adapter_loads_in_a_fresh_process_without_import",
    "streaming_merge": f"{_CONTRACT}::test_streaming_merge_equals_in_memory_merge",
    "exact_merge": f"{_CONTRACT}::test_forward_equals_merged_and_unmerge_restores",
}
_SMOA_NEFT = {
    "trl_grpo": "tests/test_trl_grpo.py::test_grpo_trains_smoa_and_neft_with_kl_to_the_disabled_adapter",
    "ddp": "tests/test_distributed_methods.py::test_trained_tensors_equal_one_process",
    "fsdp": "tests/test_distributed_methods.py::test_trained_tensors_equal_one_process",
}
# method -> capability -> the test that exercises it. Only "yes" cells have one.
_BY_METHOD: dict[str, dict[str, str]] = {
    "neuroada": {
        "trl_sft": "tests/test_trl_sft.py::test_sft_trains_only_theta_and_the_adapter_reloads",
        "trl_dpo": "tests/test_trl_dpo.py::test_dpo_first_loss_is_ln2_and_theta_trains",
        "trl_grpo": "tests/test_trl_grpo.py::test_grpo_with_kl_to_the_disabled_adapter",
        "axolotl": "tests/test_axolotl.py::test_sft_adapter_loads_with_dense_reference_logits_and_lower_loss",
        "ddp": "tests/test_distributed_ddp_fsdp.py::test_theta_after_adamw_steps_equals_one_process",
        "fsdp": "tests/test_distributed_ddp_fsdp.py::test_theta_after_adamw_steps_equals_one_process",
        "zero3": "tests/test_distributed_zero3.py::test_saved_adapter_is_complete_and_equals_the_single_process_run",
        "bnb_4bit": "tests/test_quantized.py::test_quantized_layers_select_forward_and_train_theta_only",
        "bnb_8bit": "tests/test_quantized.py::test_quantized_layers_select_forward_and_train_theta_only",
        "fsdp_qlora": "tests/test_distributed_qlora.py::test_theta_on_a_4bit_base_equals_one_process",
        "vllm": "tests/test_serving_vllm.py::test_vllm_openai_server_matches_unmerged_adapter",
    },
    "neat": {
        "trl_sft": "tests/test_trl_neat.py::test_sft_trains_exactly_like_peanut_and_reloads",
        "trl_dpo": "tests/test_trl_neat.py::test_dpo_first_loss_is_ln2_and_training_equals_peanut",
        "trl_grpo": "tests/test_trl_grpo_neat.py::test_grpo_neat_with_kl_to_the_disabled_adapter_equals_peanut",
        "axolotl": "tests/test_axolotl_neat.py::test_neat_adapter_logits_equal_dense_reference_and_peanut",
        "ddp": "tests/test_distributed_neat.py::test_neat_tensors_after_adamw_steps_equal_one_process",
        "fsdp": "tests/test_distributed_neat.py::test_neat_tensors_after_adamw_steps_equal_one_process",
        "zero3": "tests/test_distributed_neat_zero3.py::test_saved_adapter_is_complete_and_equals_one_process",
        "bnb_4bit": "tests/test_neat_quantized.py::test_forward_and_gradients_equal_the_dense_reference_of_the_dequantized_weight",
        "bnb_8bit": "tests/test_neat_quantized.py::test_forward_and_gradients_equal_the_dense_reference_of_the_dequantized_weight",
        "fsdp_qlora": "tests/test_distributed_qlora.py::test_neat_on_a_4bit_base_trains_like_one_process",
        "lora_export": "tests/test_neat_lora_export.py::test_cli_export_loads_as_lora_with_neat_logits",
        "vllm": "tests/test_serving_vllm_neat.py::test_vllm_offline_engine_serves_merged_neat_like_unmerged_adapter",
    },
    "smoa": {
        **_SMOA_NEFT,
        "trl_sft": "tests/test_trl_smoa.py::"
        "test_sft_with_one_block_trains_exactly_like_peft_hira_and_reloads_in_a_fresh_process",
        "trl_dpo": "tests/test_trl_smoa.py::test_dpo_with_one_block_first_loss_is_ln2_and_training_equals_peft_hira",
        "axolotl": "tests/test_axolotl_smoa.py::test_smoa_adapter_logits_equal_dense_reference_and_lower_loss",
        "vllm": "tests/test_serving_vllm_smoa.py::test_vllm_offline_engine_serves_merged_smoa_like_unmerged_adapter",
    },
    "neft": {
        **_SMOA_NEFT,
        "trl_sft": "tests/test_trl_neft.py::"
        "test_sft_with_a_neft_select_file_trains_exactly_like_masked_dense_finetuning",
        "trl_dpo": "tests/test_trl_neft.py::"
        "test_dpo_with_magnitude_selection_first_loss_is_ln2_and_training_equals_masked_dense",
        "axolotl": "tests/test_axolotl_neft.py::test_neft_adapter_logits_equal_dense_reference_and_lower_loss",
        "vllm": "tests/test_serving_vllm_neft.py::test_vllm_offline_engine_serves_merged_neft_like_unmerged_adapter",
    },
}
EVIDENCE: dict[tuple[str, str], str] = {
    (method, capability): test
    for method, tests in _BY_METHOD.items()
    for capability, test in {**_EVERY_METHOD, **tests}.items()
}

ZERO3_JSON = str(REPO / "axolotl_configs" / "deepspeed" / "zero3.json")
# Capability -> the Axolotl config lines that ask for it (what a "no" must refuse while the config is read).
AXOLOTL_SETTINGS = {
    "zero3": {"deepspeed": ZERO3_JSON},
    "bnb_4bit": {"load_in_4bit": True},
    "bnb_8bit": {"load_in_8bit": True},
    "fsdp_qlora": {"load_in_4bit": True, "fsdp_version": 2, "fsdp_config": {}},
}
# What each refusal must name: the setting the user wrote.
REFUSAL_NAMES = {
    "zero3": "ZeRO-3",
    "bnb_4bit": "load_in_4bit: true",
    "bnb_8bit": "load_in_8bit: true",
    "fsdp_qlora": "load_in_4bit: true",
}


def _cells(value: str) -> list[tuple[str, str]]:
    return [(spec.name, key) for spec in SHIPPED for key, cell in capability_row(spec).items() if cell == value]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_readme_table_is_the_generated_one(capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- capability-table:start -->\n(.*?)<!-- capability-table:end -->", readme, re.S)
    assert found, "README.md has no capability-table markers"
    assert found.group(1) == markdown_table(SHIPPED), "README table is stale: paste `neuroada-plugin methods --table`"
    assert plugin_main(["methods", "--table"]) == 0
    printed = capsys.readouterr().out
    for line in markdown_table(SHIPPED).splitlines():
        assert line in printed.splitlines()


def test_methods_help_explains_every_column_and_cell(capsys):
    with pytest.raises(SystemExit) as exited:
        plugin_main(["methods", "--help"])
    assert exited.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse may rewrap; compare word sequences
    for capability in CAPABILITIES:
        assert " ".join(f"{capability.title} {capability.meaning}".split()) in printed, capability.key
    for cell in ("yes =", "no =", "untested ="):
        assert cell in printed


def test_every_column_is_a_known_capability_and_every_row_complete():
    keys = [c.key for c in CAPABILITIES]
    assert len(keys) == len(set(keys)) == 15
    for spec in SHIPPED:
        assert set(capability_row(spec)) == set(keys)
        assert set(spec.untested) <= set(keys)


def test_every_yes_cell_names_a_test_that_exists_and_no_other_cell_does():
    yes = set(_cells("yes"))
    assert set(EVIDENCE) == yes, {
        "yes without evidence": sorted(yes - set(EVIDENCE)),
        "evidence for a non-yes cell": sorted(set(EVIDENCE) - yes),
    }
    for cell, node in EVIDENCE.items():
        file, _, name = node.partition("::")
        path = REPO / file
        assert path.is_file(), f"{cell}: {file} does not exist"
        assert name in _test_functions(path), f"{cell}: {file} has no test function {name}"


def test_every_no_cell_is_refused_at_config_time(tmp_path, tiny_llama_dir, capsys):
    no = _cells("no")
    assert no, "the table has no 'no' cell"
    axolotl_cases = {
        f"{m}:{key}": (m, {"adapter": m, **AXOLOTL_SETTINGS[key]}) for m, key in no if key in AXOLOTL_SETTINGS
    }
    others = [(m, key) for m, key in no if key not in AXOLOTL_SETTINGS]
    assert {key for _, key in others} <= {"lora_export"}, f"no refusal check for {others}"

    if not AXOLOTL_PYTHON.is_file():
        pytest.fail(f"{AXOLOTL_PYTHON} missing: create it with `bash scripts/setup_axolotl.sh`.", pytrace=False)
    script = (
        "import json, sys\n"
        "from neuroada_plugin.integrations.axolotl.validation import check_raw_config\n"
        "from neuroada_plugin.registry import get_method\n"
        "out = {}\n"
        "for name, (method, data) in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        check_raw_config(get_method(method), data); out[name] = 'accepted'\n"
        "    except ValueError as error:\n"
        "        out[name] = 'refused: ' + str(error)\n"
        "print('RESULTS' + json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NEUROADA_PLUGIN_METHODS"}
    env.update(AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [str(AXOLOTL_PYTHON), "-c", script, json.dumps(axolotl_cases)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0 and "RESULTS" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(done.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])
    for name, result in results.items():
        method, key = name.split(":")
        assert result.startswith("refused: "), f"{name}: the table says no, but the config was accepted"
        assert f"adapter: {method}" in result and REFUSAL_NAMES[key] in result, f"{name}: unclear refusal: {result}"

    for method, _ in others:  # LoRA export: the export command refuses another method's adapter, writing nothing
        adapter = tmp_path / f"{method}-adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": method.upper(), "base_model_name_or_path": str(tiny_llama_dir)})
        )
        save_file(
            {"base_model.model.model.layers.0.mlp.up_proj.placeholder": torch.zeros(1)},
            adapter / "adapter_model.safetensors",
        )
        output = tmp_path / f"{method}-lora"
        code = plugin_main(
            ["neat-to-lora", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(output)]
        )
        error = " ".join(capsys.readouterr().err.split())
        assert code == 2 and not output.exists(), (method, code, error)
        assert f"peft_type is '{method.upper()}', not 'NEAT'; only NEAT adapters export to LoRA" in error, error
