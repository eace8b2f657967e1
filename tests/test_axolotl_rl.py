"""Every RL mode of Axolotl 0.19 with this plugin's adapters, end to end through the ``axolotl`` CLI.

One run per mode of the CI configs in ``axolotl_configs/ci/`` (tiny random Llama, CPU, 2 steps;
paths redirected to temporary folders): IPO in both spellings, KTO, ORPO, SimPO, GRPO without
vLLM, GDPO written as GRPO with ``multi_objective_aggregation: normalize_then_sum``, EBFT
(structured, without vLLM), and NEAT on GRPO. DPO (``tiny_dpo.yml``) is trained, with the same checks,
by ``tests/test_axolotl.py`` (NeuroAda) and ``tests/test_axolotl_neat.py`` (NEAT). Each run is checked
here, in the main environment, against what the adapter must be:

* the CLI exits 0 and logs exactly ``max_steps`` finite losses;
* the output folder holds the adapter only (``adapter_config.json`` + ``adapter_model.safetensors``,
  no full-size model file), with the trained values moved away from their zero initialisation;
* ``PeftModel.from_pretrained`` of the folder gives the logits of a dense model written here from the
  saved tensors (NeuroAda: ``W[i, idx] += theta``; NEAT: ``W0 + s * B @ P(W0)`` in float64), and
  logits that differ from the base model's;
* the first loss where a zero-initialised adapter fixes it (the reference is the policy with the
  adapter disabled, or TRL's ``ref`` copy of the zero adapter, so every log-ratio is 0 at step 0):
  IPO ``(1 / (2 beta))**2`` (TRL's ``(margin - 1/(2 beta))**2``);
  KTO ``0.5`` (``1 - sigmoid(0)``, weights 1, KL estimate 0); GRPO / EBFT ``0`` (ratio 1 and, with
  every completion clipped at the same length, TRL's "dapo" loss is the mean of advantages that sum to
  zero per group; GRPO's KL term is 0 too). ORPO and SimPO are reference-free: their first loss depends
  on the random model's log-probabilities, so only finiteness is asserted;
* GRPO: ``<output_dir>/ref/`` is TRL's frozen reference adapter, as the README says: the same adapter
  config, zero theta (NEAT: zero B) and, loaded alone, exactly the base model's logits; no other mode
  writes ``ref/``.

``rl: gdpo`` cannot work with any adapter in Axolotl 0.19, and Axolotl's async GRPO trainer (or
``vllm_lora_sync``) sends vLLM LoRA weights only: both are refused at config validation, tested below
next to the launcher note of the README (``--launcher python`` does not import reward modules from the
working directory).
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from test_axolotl import (
    _VALIDATE_SCRIPT,
    AXOLOTL_BIN,
    AXOLOTL_PYTHON,
    CI_CONFIGS,
    RUN_TIMEOUT,
    _adapter_tensors,
    _check_adapter_output,
    _dense_reference_state,
    _env,
    _logged_losses,
    _model_with_state,
    _probe_ids,
    _require_axolotl,
    _run,
    _tail,
    _write_config,
    base_state,  # noqa: F401  (fixture)
    data_files,  # noqa: F401  (fixture)
    train_questions,  # noqa: F401  (fixture)
    workdir,  # noqa: F401  (fixture)
)
from test_axolotl_neat import LEARNING_RATE as NEAT_LEARNING_RATE
from test_axolotl_neat import NEAT_KEYS, _check_neat_output, _dense_model, _neat_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(CI_CONFIGS))
import rl_data  # noqa: E402  (axolotl_configs/ci/rl_data.py: the KTO / ORPO / EBFT rows of the CI configs)

BETA = 0.1  # rl_beta of tiny_dpo.yml / tiny_ipo.yml / tiny_kto.yml
STEPS = 2


@dataclass(frozen=True)
class Mode:
    config: str  # axolotl_configs/ci/<config>.yml
    data: str  # key of the rl_files fixture
    method: str = "neuroada"
    overrides: dict[str, Any] = field(default_factory=dict)
    first_loss: float | None = None  # closed form at the zero-initialised adapter, where there is one
    generates: bool = False  # GRPO family: completions sampled by the policy
    ref_adapter: bool = False  # TRL saves its frozen reference adapter in <output_dir>/ref/


def _grpo_trl(**changes: Any) -> dict[str, Any]:
    trl = dict(yaml.safe_load((CI_CONFIGS / "tiny_grpo.yml").read_text())["trl"])
    trl.update(changes)
    return trl


MODES: dict[str, Mode] = {
    "ipo": Mode("tiny_ipo", "dpo", first_loss=(1 / (2 * BETA)) ** 2),
    "ipo_as_dpo_loss_type": Mode(
        "tiny_ipo", "dpo", overrides={"rl": "dpo", "dpo_loss_type": ["ipo"]}, first_loss=(1 / (2 * BETA)) ** 2
    ),
    "kto": Mode("tiny_kto", "kto", first_loss=0.5),
    "orpo": Mode("tiny_orpo", "orpo"),
    "simpo": Mode("tiny_simpo", "dpo"),
    "grpo": Mode("tiny_grpo", "dpo", first_loss=0.0, generates=True, ref_adapter=True),
    "gdpo_as_grpo": Mode(
        "tiny_grpo",
        "dpo",
        overrides={
            "trl": _grpo_trl(
                multi_objective_aggregation="normalize_then_sum",
                reward_funcs=["rewards_tiny.vowel_share", "rewards_tiny.distinct_letter_share"],
            )
        },
        first_loss=0.0,
        generates=True,
        ref_adapter=True,
    ),
    "ebft": Mode("tiny_ebft", "ebft", first_loss=0.0, generates=True),
    "neat_grpo": Mode("tiny_grpo", "dpo", method="neat", first_loss=0.0, generates=True, ref_adapter=True),
}


@pytest.fixture(scope="module")
def rl_files(data_files) -> dict[str, Path]:  # noqa: F811
    """The DPO pairs of tests/test_axolotl.py and the KTO / ORPO / EBFT rows made from them by rl_data.py."""
    files = rl_data.write_rl_files(data_files["dpo"], data_files["dpo"].parent, "train")
    return {"dpo": data_files["dpo"], **files}


def _train(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``axolotl train <config> --launcher python`` with ``PYTHONPATH=axolotl_configs/ci``, as the README says.

    Without it the GRPO configs' reward and transform module (``rewards_tiny``) cannot be imported;
    the other modes do not need it.
    """
    _require_axolotl()
    return subprocess.run(
        [str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"],
        cwd=cwd,
        env={**_env(), "PYTHONPATH": str(CI_CONFIGS)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def _logged_steps(log: str) -> list[dict[str, str]]:
    """The per-step log dicts (``{'loss': '...', ...}``, values as the strings Axolotl prints)."""
    return [ast.literal_eval(match) for match in re.findall(r"\{'loss': [^{}]*\}", log)]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(MODES))
def test_rl_mode_trains_the_adapter(name, workdir, tiny_llama_dir, rl_files, base_state, train_questions):  # noqa: F811
    mode = MODES[name]
    overrides: dict[str, Any] = {"max_steps": STEPS, "output_dir": str(workdir / f"out-{name}"), **mode.overrides}
    if mode.method == "neat":
        overrides.update(NEAT_KEYS, learning_rate=NEAT_LEARNING_RATE)
    config = _write_config(mode.config, workdir, tiny_llama_dir, rl_files[mode.data], **overrides)
    process = _train(config, workdir)
    assert process.returncode == 0, f"axolotl train ({name}) failed:\n{_tail(process)}"
    output_dir = workdir / f"out-{name}"

    losses = _logged_losses(process.stdout)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (losses, _tail(process))
    if mode.first_loss is not None:
        # Axolotl prints 4 significant digits; a loss of 0 prints as rounding noise such as -1.788e-07.
        assert losses[0] == pytest.approx(mode.first_loss, rel=1e-3, abs=1e-5), losses
    if mode.generates:
        first = _logged_steps(process.stdout)[0]
        # The closed form 0 holds because every sampled completion ran to max_completion_length (equal lengths).
        assert first["completions/min_length"] == first["completions/max_length"], first
        assert float(first["reward_std"]) > 0, f"all rewards equal: nothing to learn from\n{first}"
        if mode.ref_adapter:
            assert float(first["kl"]) == 0.0, first  # the reference is the policy at step 0

    # Adapter-only save, trained values moved from zero (checked inside the helpers).
    if mode.method == "neuroada":
        adapter = _check_adapter_output(output_dir, base_state)
    else:
        adapter = _check_neat_output(output_dir, base_state)

    # The saved adapter, loaded by PEFT, is the dense model written from its tensors, and not the base model.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = _probe_ids(tokenizer, train_questions)
    saved_config = json.loads((output_dir / "adapter_config.json").read_text())
    dtype = torch.float32 if mode.method == "neuroada" else torch.float64
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), output_dir
    ).eval()
    if mode.method == "neuroada":
        reference = _model_with_state(tiny_llama_dir, _dense_reference_state(base_state, adapter))
        tolerance = 1e-5
    else:
        peft_model = peft_model.double()
        reference = _dense_model(tiny_llama_dir, base_state, adapter, saved_config)
        tolerance = 1e-9
    got = _logits(peft_model, ids)
    torch.testing.assert_close(got, _logits(reference, ids), rtol=tolerance, atol=tolerance)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    base_logits = _logits(base_model, ids)
    assert (got - base_logits).abs().max() > 1e-3, "the trained adapter does not change the logits"

    # TRL's reference adapter: written for GRPO (Axolotl hands TRL a PeftModel, beta > 0), by no other mode.
    ref_dir = output_dir / "ref"
    assert ref_dir.is_dir() == mode.ref_adapter, sorted(p.name for p in output_dir.iterdir())
    if mode.ref_adapter:
        assert sorted(p.name for p in ref_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.loads((ref_dir / "adapter_config.json").read_text()) == saved_config
        ref_raw, raw = (
            load_file(ref_dir / "adapter_model.safetensors"),
            load_file(output_dir / "adapter_model.safetensors"),
        )
        assert set(ref_raw) == set(raw)
        if mode.method == "neuroada":
            for key, (theta, indices) in _adapter_tensors(ref_dir).items():
                assert torch.count_nonzero(theta) == 0, f"{key}: ref theta is not the zero initialisation"
                assert torch.equal(indices, adapter[key][1]), f"{key}: ref connections differ from the trained ones"
        else:
            for key, tensors in _neat_tensors(ref_dir).items():
                assert torch.count_nonzero(tensors["B"]) == 0, f"{key}: ref B is not the zero initialisation"
        ref_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype), ref_dir
        ).eval()
        assert torch.equal(_logits(ref_model, ids), base_logits), "the ref adapter is not the base model"


# ----------------------------------------------------------------------------------------------------------------
# What cannot work, and the launcher note
# ----------------------------------------------------------------------------------------------------------------


def test_rl_settings_that_cannot_train_the_adapter_are_refused_at_config_validation(workdir, tiny_llama_dir, rl_files):  # noqa: F811
    """Refused while the config is read, for NeuroAda and NEAT, each naming what trains instead:

    * ``rl: gdpo`` fails with any adapter in Axolotl 0.19 (TRL refuses a PeftModel plus a peft_config);
      its GRPO spelling is accepted;
    * vLLM generation with Axolotl's async GRPO trainer (``async_prefetch`` / ``use_data_producer``) or
      ``vllm_lora_sync`` sends the server LoRA weights only: the adapter would train against a stale
      server. The synchronous trainer with vLLM (TRL's ``merge_adapter`` sync) is accepted.
    """
    grpo = {"trl": _grpo_trl(multi_objective_aggregation="normalize_then_sum")}
    vllm = {"trl": _grpo_trl(use_vllm=True, vllm_mode="server")}
    sync_cases = {
        "async_prefetch": {"trl": _grpo_trl(use_vllm=True, vllm_mode="server", async_prefetch=True)},
        "vllm_lora_sync": {"trl": _grpo_trl(use_vllm=True, vllm_mode="server", vllm_lora_sync=True)},
        "use_data_producer": {"trl": _grpo_trl(use_vllm=True, vllm_mode="server", use_data_producer=True)},
    }
    data = rl_files["dpo"]
    paths = {
        "gdpo": _write_config("tiny_grpo", workdir, tiny_llama_dir, data, rl="gdpo"),
        "neat_gdpo": _write_config("tiny_grpo", workdir, tiny_llama_dir, data, rl="gdpo", **NEAT_KEYS),
        "grpo_normalize_then_sum": _write_config("tiny_grpo", workdir, tiny_llama_dir, data, **grpo),
        "grpo_vllm_synchronous": _write_config("tiny_grpo", workdir, tiny_llama_dir, data, **vllm),
        "async_without_vllm": _write_config(
            "tiny_grpo", workdir, tiny_llama_dir, data, trl=_grpo_trl(async_prefetch=True)
        ),
        **{
            f"grpo_{name}": _write_config("tiny_grpo", workdir, tiny_llama_dir, data, **overrides)
            for name, overrides in sync_cases.items()
        },
        "neat_grpo_async_prefetch": _write_config(
            "tiny_grpo", workdir, tiny_llama_dir, data, **sync_cases["async_prefetch"], **NEAT_KEYS
        ),
    }
    process = _run(
        [str(AXOLOTL_PYTHON), "-c", _VALIDATE_SCRIPT, json.dumps({k: str(v) for k, v in paths.items()})],
        cwd=workdir,
        timeout=240,
    )
    assert process.returncode == 0 and "RESULTS" in process.stdout, _tail(process)
    results = json.loads(process.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])
    for name in ("grpo_normalize_then_sum", "grpo_vllm_synchronous", "async_without_vllm"):
        assert results[name]["ok"], (name, results[name])
    for name, method in [("gdpo", "neuroada"), ("neat_gdpo", "neat")]:
        assert not results[name]["ok"], f"{name}: config was accepted"
        for fragment in [
            f"`rl: gdpo` cannot train a {method} adapter",
            "You passed a `PeftModel` instance together with a `peft_config`",
            "LoRA fails the same way",
            "`rl: grpo` with `trl: {multi_objective_aggregation: normalize_then_sum}`",
        ]:
            assert fragment in results[name]["error"], f"{name}: {fragment!r} not in:\n{results[name]['error']}"
    for name, key, method in [
        *[(f"grpo_{key}", key, "neuroada") for key in sync_cases],
        ("neat_grpo_async_prefetch", "async_prefetch", "neat"),
    ]:
        error = results[name].get("error", "")
        assert not results[name]["ok"], f"{name}: config was accepted"
        for fragment in [
            f"`rl: grpo` with `trl.use_vllm: true` and `trl.{key}: true`",
            f"would train the {method} adapter against a vLLM server that never receives it",
            "sends the server LoRA weights only",
            f"Remove `trl.{key}`",
        ]:
            assert fragment in error, f"{name}: {fragment!r} not in:\n{error}"


def test_launcher_python_does_not_import_reward_modules_from_the_working_directory(
    workdir,  # noqa: F811
    tiny_llama_dir,
    rl_files,
):
    """The README's launcher note: ``--launcher python`` runs in-process, without the working directory on
    ``sys.path``, so a GRPO transform module lying there is not found (hence ``PYTHONPATH=axolotl_configs/ci``)."""
    cwd = workdir / "launcher"
    cwd.mkdir()
    (cwd / "rewards_tiny.py").write_text((CI_CONFIGS / "rewards_tiny.py").read_text())
    config = _write_config("tiny_grpo", cwd, tiny_llama_dir, rl_files["dpo"])
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=cwd, timeout=240)
    assert "PYTHONPATH" not in _env()
    assert process.returncode != 0, _tail(process)
    assert "No module named 'axolotl.prompt_strategies.dpo.rewards_tiny'" in process.stdout, _tail(process)
    assert "Failed to load dataset transform function for type 'rewards_tiny.prompt_transform'" in process.stdout
    assert "Loading weights" not in process.stdout  # it stops while preparing the data
