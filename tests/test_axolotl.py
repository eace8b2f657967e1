"""`adapter: neuroada` in Axolotl, end to end: SFT and DPO training, config validation, merge-lora.

Axolotl 0.19 pins versions that conflict with the main environment, so it lives in
``.venv-axolotl`` (``scripts/setup_axolotl.sh``) and every Axolotl step runs there in a
subprocess; this pytest process (main ``.venv``) checks the results against references it
computes itself:

* connection indices against ``torch.topk(|W|)`` of the base checkpoint,
* logits of the saved adapter against a dense model with ``W[i, idx] += theta`` built here,
* the merged checkpoint against that dense ``W + scatter(theta)`` bit for bit,
* training progress by the answer-token loss of the training rows, base vs adapted.

The CI configs in ``axolotl_configs/ci/`` are the ones run; only their paths are redirected
to temporary folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import commonsense

REPO = Path(__file__).resolve().parent.parent
AXOLOTL_VENV = REPO / ".venv-axolotl"
AXOLOTL_BIN = AXOLOTL_VENV / "bin" / "axolotl"
AXOLOTL_PYTHON = AXOLOTL_VENV / "bin" / "python"
CI_CONFIGS = REPO / "axolotl_configs" / "ci"
PLUGIN = "neuroada_plugin.axolotl.NeuroAdaPlugin"
TOP_K = 2  # what axolotl_configs/ci/*.yml set
TRAIN_ROWS = 32
RUN_TIMEOUT = 420


def _require_axolotl() -> None:
    if not AXOLOTL_BIN.is_file() or not AXOLOTL_PYTHON.is_file():
        pytest.fail(
            f"Axolotl environment missing: {AXOLOTL_BIN} not found. Create it with `bash scripts/setup_axolotl.sh` "
            "(a separate venv: axolotl 0.19 pins transformers/peft/trl versions that conflict with .venv).",
            pytrace=False,
        )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",  # otherwise telemetry retries an unreachable host and can hang the process
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PATH=f"{AXOLOTL_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("PYTHONPATH", None)  # the main venv's paths must not leak into the axolotl venv
    return env


def _run(args: list[str], cwd: Path, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command of the axolotl venv with stdin closed and a time limit; stdout+stderr in ``.stdout``."""
    _require_axolotl()
    return subprocess.run(
        args,
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def _tail(process: subprocess.CompletedProcess, n: int = 4000) -> str:
    return process.stdout[-n:]


def _write_config(name: str, workdir: Path, model_dir: Path, data: Path, **overrides: Any) -> Path:
    """``axolotl_configs/ci/<name>.yml`` with its paths pointed into ``workdir``."""
    config = yaml.safe_load((CI_CONFIGS / f"{name}.yml").read_text())
    config.update(
        base_model=str(model_dir),
        tokenizer_config=str(model_dir),
        output_dir=str(workdir / f"out-{name}"),
        dataset_prepared_path=str(workdir / f"prepared-{name}"),
    )
    config["datasets"][0]["path"] = str(data)
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = workdir / f"{name}-{len(list(workdir.glob('*.yml')))}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _logged_losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"\{'loss': '([-+0-9.eE]+)'", log)]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl")


@pytest.fixture(scope="module")
def train_questions() -> list[commonsense.MCQuestion]:
    return commonsense.make_splits(commonsense.load_questions("csqa")).train[:TRAIN_ROWS]


def write_data_files(folder: Path, questions: list[commonsense.MCQuestion]) -> dict[str, Path]:
    """SFT conversations (``{"messages"}``) and constructed DPO pairs of the same questions, under ``folder``."""
    paths = commonsense.export_jsonl(questions, folder, "train")
    conversations = [{"messages": row["prompt"] + row["completion"]} for row in commonsense.sft_rows(questions)]
    paths["messages"] = commonsense.write_jsonl(conversations, folder / "train.messages.jsonl")
    return paths


@pytest.fixture(scope="module")
def data_files(workdir, train_questions) -> dict[str, Path]:
    return write_data_files(workdir / "data", train_questions)


@pytest.fixture(scope="module")
def sft_run(workdir, tiny_llama_dir, data_files) -> tuple[Path, str]:
    config = _write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"])
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT) failed:\n{_tail(process)}"
    return config, process.stdout


@pytest.fixture(scope="module")
def base_state(tiny_llama_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_llama_dir / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def _adapter_tensors(output_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight key -> (theta, indices) read straight from adapter_model.safetensors."""
    raw = load_file(output_dir / "adapter_model.safetensors")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, theta in raw.items():
        if key.endswith(".neuroada_theta"):
            module = key.removeprefix("base_model.model.").removesuffix(".neuroada_theta")
            out[f"{module}.weight"] = (theta, raw[key.replace("neuroada_theta", "neuroada_indices")])
    return out


def _dense_reference_state(base: dict[str, torch.Tensor], adapter: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """The base state dict with ``W[i, idx[i, j]] += theta[i, j]`` written densely, in float32."""
    state = {k: v.clone() for k, v in base.items()}
    for key, (theta, indices) in adapter.items():
        state[key] = state[key].scatter_add(1, indices.long(), theta.to(state[key].dtype))
    return state


def _model_with_state(model_dir: Path, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


def _probe_ids(tokenizer, questions) -> torch.Tensor:
    texts = [commonsense.prompt_text(q) + " " + commonsense.answer_text(q) for q in questions[:4]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"]


def _answer_loss(model, tokenizer, questions) -> float:
    """Mean cross-entropy of the answer tokens (``"B. bookstore"`` + end of turn) after the chat prompt.

    Tokenised by :func:`harness.commonsense.encode_question` (the model's chat template,
    as TRL renders it), independently of Axolotl's own tokenisation of the training rows.
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for q in questions:
            prompt, candidates = commonsense.encode_question(tokenizer, q)
            answer = candidates[q.label]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            total += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum").item()
            count += len(answer)
    return total / count


# How much the tiny CI runs must lower the answer loss (from ~10.77). The learning rates are chosen so that the
# drop is several times this: NeuroAda 0.21-0.26, NEAT ~0.25, SMoA 0.16-0.21 over seeds 0-3 on an AMD EPYC
# (NeFT 0.29, seed 0), far from where another CPU's rounding could move it across.
MIN_ANSWER_LOSS_DROP = 0.05


def assert_answer_loss_dropped(base_model, trained_model, tokenizer, questions, label: str) -> None:
    """Training lowered the answer loss it optimised, measured here (not read from axolotl's log)."""
    before = _answer_loss(base_model, tokenizer, questions)
    after = _answer_loss(trained_model, tokenizer, questions)
    print(f"answer loss on the training rows: base {before:.4f} -> {label} {after:.4f}")
    assert after < before - MIN_ANSWER_LOSS_DROP, (label, before, after)


def _check_adapter_output(
    output_dir: Path, base: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter-only PEFT files, the right config, trained theta and the paper's top-|W| connections."""
    files = sorted(p.name for p in output_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files, files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), (
        f"a full model was saved next to the adapter: {files}"
    )
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEUROADA" and config["top_k"] == TOP_K and config["selection"] == "magnitude"
    adapter = _adapter_tensors(output_dir)
    adapted_modules = {k.rsplit(".", 2)[-2] for k in adapter}
    assert adapted_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapter) == 7 * 2  # 7 projections x 2 layers of the tiny Llama
    for key, (theta, indices) in adapter.items():
        weight = base[key]
        assert theta.dtype == torch.float32 and theta.shape == (weight.shape[0], TOP_K)
        assert torch.count_nonzero(theta) > 0.9 * theta.numel(), f"{key}: theta barely trained"
        expected = torch.topk(weight.abs(), TOP_K, dim=1).indices.sort(dim=1).values
        assert torch.equal(indices.long().sort(dim=1).values, expected), f"{key}: not the top-|W| connections"
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


def test_sft_trains_and_saves_adapter_only(sft_run, base_state):
    config, log = sft_run
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    _check_adapter_output(output_dir, base_state)
    # k=2 values per output neuron: 2 layers x (q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64) x 2.
    assert "trainable params: 2,048" in log
    losses = _logged_losses(log)
    assert len(losses) == yaml.safe_load(config.read_text())["max_steps"], log[-3000:]
    assert all(math.isfinite(x) for x in losses)


def test_sft_adapter_loads_with_dense_reference_logits_and_lower_loss(
    sft_run, tiny_llama_dir, base_state, train_questions
):
    config, _ = sft_run
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    adapter = _adapter_tensors(output_dir)

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), output_dir
    ).eval()
    # The frozen base weights are bit-identical to the checkpoint's.
    for name, param in peft_model.named_parameters():
        if name.endswith("base_layer.weight"):
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, base_state[key]), name
    reference = _model_with_state(tiny_llama_dir, _dense_reference_state(base_state, adapter))
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert_answer_loss_dropped(base_model, peft_model, tokenizer, train_questions, "NeuroAda adapter")


def test_merge_lora_writes_plain_checkpoint_with_adapter_logits(
    sft_run, workdir, tiny_llama_dir, base_state, train_questions
):
    config, _ = sft_run
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config)], cwd=workdir)
    assert process.returncode == 0, f"axolotl merge-lora failed:\n{_tail(process)}"
    merged_dir = output_dir / "merged"
    merged = load_file(merged_dir / "model.safetensors")

    # A plain checkpoint: the base model's keys, nothing of the adapter.
    assert set(merged) == set(base_state), set(merged) ^ set(base_state)
    # Every weight equals the dense W + scatter(theta) computed here, bit for bit; unadapted ones are untouched.
    adapter = _adapter_tensors(output_dir)
    reference_state = _dense_reference_state(base_state, adapter)
    for key, tensor in merged.items():
        assert tensor.dtype == base_state[key].dtype, key
        assert torch.equal(tensor, reference_state[key]), key
        if key not in adapter:
            assert torch.equal(tensor, base_state[key]), key

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), output_dir
    ).eval()
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want = merged_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_run_that_adds_a_pad_token_merges_verifies_and_equals_axolotl_merge_lora(
    workdir, tiny_llama_dir, data_files, tmp_path
):
    """Axolotl's own lora-1b.yml sets ``special_tokens: {pad_token: "<|end_of_text|>"}``, which the SmolLM2
    tokenizer lacks: Axolotl resizes the vocabulary and the adapter saves both embedding layers whole.
    ``neuroada-plugin merge`` and ``verify`` take it, and equal ``axolotl merge-lora`` tensor for tensor."""
    from neuroada_plugin.cli import main as plugin_main

    config = _write_config(
        "tiny_sft",
        workdir,
        tiny_llama_dir,
        data_files["messages"],
        special_tokens={"pad_token": "<|end_of_text|>"},
        max_steps=2,
        output_dir=str(workdir / "out-pad-token"),
        dataset_prepared_path=str(workdir / "prepared-pad-token"),
    )
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train failed:\n{_tail(process)}"
    output_dir = workdir / "out-pad-token"
    saved = load_file(output_dir / "adapter_model.safetensors")
    vocab = len(AutoTokenizer.from_pretrained(output_dir))
    assert vocab == 49153 and saved["base_model.model.model.embed_tokens.weight"].shape[0] == vocab

    merged = tmp_path / "merged"
    assert (
        plugin_main(
            ["merge", "--base", str(tiny_llama_dir), "--adapter", str(output_dir), "--output", str(merged), "-q"]
        )
        == 0
    )
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == vocab
    assert AutoTokenizer.from_pretrained(merged).pad_token == "<|end_of_text|>"
    assert (
        plugin_main(
            ["verify", "--base", str(tiny_llama_dir), "--adapter", str(output_dir), "--merged", str(merged), "-q"]
        )
        == 0
    )

    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config)], cwd=workdir)
    assert process.returncode == 0, f"axolotl merge-lora failed:\n{_tail(process)}"
    theirs, ours = load_file(output_dir / "merged" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert set(theirs) == set(ours)
    for key, tensor in theirs.items():
        assert tensor.dtype == ours[key].dtype and torch.equal(tensor, ours[key]), key


def test_lora_model_dir_loads_the_saved_adapter_trainable(sft_run, workdir):
    """``lora_model_dir`` continues from the saved values (not a fresh zero adapter), through the plugin's loader."""
    config, _ = sft_run
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    script = textwrap.dedent(
        f"""
        import torch
        from axolotl.utils.dict import DictDefault
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        from neuroada_plugin.axolotl import NeuroAdaPlugin

        cfg = DictDefault(adapter="neuroada", lora_model_dir={str(output_dir)!r}, neuroada_top_k={TOP_K})
        base = AutoModelForCausalLM.from_pretrained({str(yaml.safe_load(config.read_text())["base_model"])!r})
        model, peft_config = NeuroAdaPlugin().load_adapter(base, cfg)
        saved = load_file({str(output_dir / "adapter_model.safetensors")!r})
        trainable = {{n: p for n, p in model.named_parameters() if p.requires_grad}}
        assert trainable and all("neuroada_theta" in n for n in trainable), sorted(trainable)
        for name, param in trainable.items():
            assert torch.equal(param.detach(), saved[name.replace(".default", "")]), name
        assert peft_config.top_k == {TOP_K}
        assert NeuroAdaPlugin().load_adapter(base, DictDefault(adapter="lora")) is None
        print("LOADED", len(trainable))
        """
    )
    process = _run([str(AXOLOTL_PYTHON), "-c", script], cwd=workdir, timeout=180)
    assert process.returncode == 0 and "LOADED 14" in process.stdout, _tail(process)


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------


def test_dpo_trains_with_adapter_disabled_reference(workdir, tiny_llama_dir, data_files, base_state, train_questions):
    config = _write_config("tiny_dpo", workdir, tiny_llama_dir, data_files["dpo"])
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (DPO) failed:\n{_tail(process)}"
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    adapter = _check_adapter_output(output_dir, base_state)

    losses = _logged_losses(process.stdout)
    assert len(losses) == yaml.safe_load(config.read_text())["max_steps"]
    # No reference model is loaded: the reference is the policy with the adapter disabled, which
    # equals the policy at step 0 (zero theta), so the first DPO loss is exactly ln 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4), losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), output_dir
    ).eval()
    reference = _model_with_state(tiny_llama_dir, _dense_reference_state(base_state, adapter))
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------------------------------------------
# Validation: bad configs fail while the config is read, with the key named
# ----------------------------------------------------------------------------------------------------------------

# (overrides of the SFT CI config, substrings the error must contain)
INVALID_CONFIGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "top_k_zero": ({"neuroada_top_k": 0}, ["neuroada_top_k", "greater than or equal to 1"]),
    "top_k_not_int": ({"neuroada_top_k": "many"}, ["neuroada_top_k", "valid integer"]),
    "selection": ({"neuroada_selection": "largest"}, ["neuroada_selection", "'magnitude', 'smallest' or 'random'"]),
    "theta_dtype": ({"neuroada_theta_dtype": "int8"}, ["neuroada_theta_dtype", "'float32'"]),
    "typo": ({"neuroada_topk": 4}, ["Unknown neuroada_* key", "`neuroada_topk`", "did you mean `neuroada_top_k`"]),
    "prefix_typo": (
        {"neuroda_top_k": 20},
        ["`neuroda_top_k` is not a key of Axolotl", "did you mean `neuroada_top_k`? Write `neuroada_top_k: 20`"],
    ),
    "bare_field": (
        {"top_k": 20},
        ["`top_k` is not an Axolotl key", "did you mean `neuroada_top_k`? Write `neuroada_top_k: 20`"],
    ),
    "core_rule": (
        {"neuroada_layers_pattern": "layers"},
        ["neuroada_layers_pattern only makes sense together with layers_to_transform"],
    ),
    "quantized": ({"gptq": True}, ["cannot train on this quantized base model", "gptq: true", "load_in_4bit: true"]),
    "lora_keys": (
        {"lora_r": 8, "lora_target_modules": ["q_proj"]},
        [
            "LoRA-only setting",
            "`lora_target_modules` (use `neuroada_target_modules`)",
            "`lora_r` (no neuroada equivalent)",
        ],
    ),
    "merge_method": ({"merge_method": "memory_efficient"}, ["merge_method: memory_efficient", "merge_method: legacy"]),
    "keys_without_adapter": ({"adapter": "lora"}, ["neuroada_top_k set, but `adapter:` is 'lora'"]),
    "rl_continuation": (
        {
            "rl": "dpo",
            "lora_model_dir": "/nonexistent",
            "datasets": [{"path": "x.jsonl", "type": "chatml.prompt_pairs"}],
        },
        ["`rl: dpo` with `lora_model_dir` would restart the neuroada adapter from zero"],
    ),
}

_VALIDATE_SCRIPT = """
import json, sys
from axolotl.cli.config import load_cfg
results = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        cfg = load_cfg(path)
        results[name] = {"ok": True, "merge_method": cfg.merge_method, "top_k": cfg.neuroada_top_k}
    except Exception as error:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
print("RESULTS" + json.dumps(results))
"""


def test_invalid_neuroada_settings_fail_at_config_validation(workdir, tiny_llama_dir, data_files):
    paths = {"valid": str(_write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"]))}
    # Axolotl's own keys are never taken for misspelt method keys: `seed` is also a NeuroAda field name.
    paths["valid_axolotl_keys"] = str(
        _write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"], seed=7, lora_dropout=0.0)
    )
    for name, (overrides, _) in INVALID_CONFIGS.items():
        paths[name] = str(_write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"], **overrides))
    process = _run([str(AXOLOTL_PYTHON), "-c", _VALIDATE_SCRIPT, json.dumps(paths)], cwd=workdir, timeout=240)
    assert process.returncode == 0 and "RESULTS" in process.stdout, _tail(process)
    results = json.loads(process.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])

    assert results["valid"] == {"ok": True, "merge_method": "legacy", "top_k": TOP_K}, results["valid"]
    assert results["valid_axolotl_keys"] == results["valid"], results["valid_axolotl_keys"]
    for name, (_, expected) in INVALID_CONFIGS.items():
        result = results[name]
        assert not result["ok"], f"{name}: config was accepted"
        for fragment in expected:
            assert fragment in result["error"], f"{name}: {fragment!r} not in error:\n{result['error']}"


def test_cli_rejects_missing_plugin_and_bad_value_before_loading_anything(workdir, tiny_llama_dir, data_files):
    no_plugin = _write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"], plugins=None)
    bad_value = _write_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"], neuroada_top_k=-3)
    for config, expected in [
        (no_plugin, ["Adapter 'neuroada' is not built in and was not registered by a plugin", "`plugins:`"]),
        (bad_value, ["neuroada_top_k", "greater than or equal to 1"]),
    ]:
        process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir, timeout=180)
        assert process.returncode != 0, _tail(process)
        for fragment in expected:
            assert fragment in process.stdout, _tail(process)
        # Rejected while reading the config: no dataset was prepared and no weights were loaded.
        assert "Loading weights" not in process.stdout and "Tokenizing" not in process.stdout, _tail(process)
