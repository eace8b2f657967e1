"""The README's quick start, run as a newcomer would paste it: offline, with the project's Python.

The code is read from README.md (the "## Quick start" section), so the README cannot drift from
what is tested. Its shell lines (offline variables, model conversion) run in the checkout; its
Python block runs in a fresh subprocess in a temporary working directory that holds the
converted SmolLM2-135M-Instruct at the relative path the README names (``.cache/...``, as in the
checkout). The block's ``# ... train as usual ...`` placeholder becomes one AdamW step, so that
saving and merging act on a non-zero adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PLACEHOLDER = "# ... train as usual"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def quickstart_section() -> str:
    """README.md from "## Quick start" up to the next heading of any level (fenced code skipped)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines(keepends=True)
    start = lines.index("## Quick start\n") + 1  # ValueError: the section was renamed
    fenced = False
    for end in range(start, len(lines)):
        if lines[end].startswith("```"):
            fenced = not fenced
        elif not fenced and lines[end].startswith("#"):
            break
    return "".join(lines[start:end])


def python_blocks(section: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def shell_lines(section: str) -> list[str]:
    """The section's indented (4-space) code lines, in order, before its first fenced block."""
    prose = section.split("```", 1)[0]
    return [line[4:] for line in prose.splitlines() if line.startswith("    ") and line.strip()]


def safetensors_numel(path: Path) -> int:
    """Parameters in a safetensors file, read from its JSON header (no torch)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return sum(math.prod(entry["shape"]) for entry in header.values())


def neuroada_k1_count(config: dict) -> int:
    """NeuroAda top_k=1 trains one value per output neuron: the sum of out_features of q/k/v/o/gate/up/down."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = o = config["num_attention_heads"] * head_dim
    k = v = config["num_key_value_heads"] * head_dim
    gate = up = config["intermediate_size"]
    down = hidden
    return config["num_hidden_layers"] * (q + k + v + o + gate + up + down)


# Runs in place of the block's training placeholder: one optimizer step, then the adapter's logits
# (and the base's, adapter disabled) on fixed tokens, kept for the checks after the block.
TRAIN_STEP = """\
import torch as _t
_t.manual_seed(0)
_ids = _t.randint(0, model.config.vocab_size, (1, 12))
_opt = _t.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model(input_ids=_ids, labels=_ids).loss.backward()
_opt.step()
_opt.zero_grad()
model.eval()
with _t.no_grad():
    _adapter_logits = model(input_ids=_ids).logits
    with model.disable_adapter():
        _base_logits = model(input_ids=_ids).logits
"""

# Runs after the block: compare the merged model with the adapter and with the base weights, and the
# saved adapter (reloaded onto a fresh base) with the in-memory one; report as JSON.
CHECKS = """\
import json as _json
from peft import PeftModel as _PeftModel
from safetensors.torch import load_file as _load_file

with _t.no_grad():
    _merged_logits = merged(input_ids=_ids).logits
_base_dir = model.peft_config["default"].base_model_name_or_path
_base = _load_file(_base_dir + "/model.safetensors")
_saved = _load_file("my-adapter/adapter_model.safetensors")
_prefix = "base_model.model."
_changed = _placed = _theta_nonzero = _theta_total = 0
_merged_sd = merged.state_dict()
for _key in [k for k in _saved if k.endswith(".neuroada_theta")]:
    _module = _key[len(_prefix):-len(".neuroada_theta")]
    _theta = _saved[_key]
    _index = _saved[_prefix + _module + ".neuroada_indices"].long()
    _w0 = _base[_module + ".weight"]
    _w1 = _merged_sd[_module + ".weight"]
    _delta = _w1 - _w0
    _rows = _t.arange(_w0.shape[0]).unsqueeze(1)
    _changed += int((_delta != 0).sum())
    _placed += int((_delta[_rows, _index] != 0).sum())
    _expected = _w0.clone()
    _expected[_rows, _index] += _theta.to(_w0.dtype)
    assert _t.allclose(_w1, _expected, rtol=0, atol=1e-6), _module
    _theta_nonzero += int((_theta != 0).sum())
    _theta_total += _theta.numel()

from transformers import AutoModelForCausalLM as _Auto
_reloaded = _PeftModel.from_pretrained(_Auto.from_pretrained(_base_dir), "my-adapter").eval()
with _t.no_grad():
    _reloaded_logits = _reloaded(input_ids=_ids).logits
print("QUICKSTART_RESULT " + _json.dumps({
    "merged_type": type(merged).__name__,
    "merged_has_adapter_params": any("neuroada" in n for n, _ in merged.named_parameters()),
    "theta_total": _theta_total,
    "theta_nonzero": _theta_nonzero,
    "weights_changed": _changed,
    "changed_at_indices": _placed,
    "adapter_vs_base": (_adapter_logits - _base_logits).abs().max().item(),
    "merged_vs_adapter": (_merged_logits - _adapter_logits).abs().max().item(),
    "reloaded_vs_adapter": (_reloaded_logits - _adapter_logits).abs().max().item(),
}))
"""


def offline_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({var: "1" for var in OFFLINE_VARS}, NEUROADA_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    return env


def test_quickstart_shell_lines_set_offline_variables_and_convert(smollm2_dir: Path) -> None:
    lines = shell_lines(quickstart_section())
    exports = [line for line in lines if line.startswith("export ")]
    assert exports, lines
    exported = dict(item.split("=", 1) for item in shlex.split(exports[0])[1:])
    for var in OFFLINE_VARS:
        assert exported.get(var) == "1", exported
    assert exported.get("NEUROADA_CACHE") == "$PWD/.cache", exported
    commands = [line for line in lines if line.startswith(".venv/bin/python ")]
    assert len(commands) == 1, lines
    if smollm2_dir.resolve() != (ROOT / ".cache" / "SmolLM2-135M-Instruct").resolve():
        pytest.skip("NEUROADA_CACHE points outside the checkout; running the README's lines would convert a copy")
    script = "\n".join([*exports, commands[0].replace(".venv/bin/python", shlex.quote(sys.executable), 1)])
    env = {k: v for k, v in os.environ.items() if k not in (*OFFLINE_VARS, "NEUROADA_CACHE", "PYTHONPATH")}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(ROOT / ".cache" / "SmolLM2-135M-Instruct")


def test_quickstart_python_block_runs_offline(smollm2_dir: Path, tmp_path: Path) -> None:
    blocks = python_blocks(quickstart_section())
    assert len(blocks) == 1, "the quick start should be one Python block"
    block = blocks[0]
    paths = re.findall(r'from_pretrained\("([^"]+)"\)', block)
    assert paths == [".cache/SmolLM2-135M-Instruct"], paths  # the folder the README's set-up fills
    assert TRAIN_PLACEHOLDER in block

    # The working directory looks like the checkout: the converted model at the README's relative path.
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "SmolLM2-135M-Instruct").symlink_to(smollm2_dir.resolve(), target_is_directory=True)
    lines = [TRAIN_STEP if line.startswith(TRAIN_PLACEHOLDER) else line for line in block.splitlines()]
    (tmp_path / "quickstart.py").write_text("\n".join(lines) + "\n" + CHECKS, encoding="utf-8")

    out = subprocess.run(
        [sys.executable, "quickstart.py"],
        cwd=tmp_path,
        env=offline_env(tmp_path / ".cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    config = json.loads((smollm2_dir / "config.json").read_text())
    trainable = neuroada_k1_count(config)
    total = safetensors_numel(smollm2_dir / "model.safetensors") + trainable
    assert trainable == 155_520  # SmolLM2-135M: 30 layers x (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    printed = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    assert printed in out.stdout.splitlines(), out.stdout
    assert f"# {printed}" in block  # the output the README shows is the output

    adapter = tmp_path / "my-adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    saved_config = json.loads((adapter / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "NEUROADA" and saved_config["top_k"] == 1
    assert saved_config["base_model_name_or_path"] == ".cache/SmolLM2-135M-Instruct"

    result = json.loads(out.stdout.split("QUICKSTART_RESULT ", 1)[1].splitlines()[0])
    assert result["merged_type"] == "LlamaForCausalLM" and not result["merged_has_adapter_params"]
    assert result["theta_total"] == trainable
    assert result["theta_nonzero"] > 0.99 * trainable  # one AdamW step moved (almost) every connection
    # The merge wrote theta into exactly the recorded entries (one per output row) and nowhere else.
    assert result["weights_changed"] == result["changed_at_indices"] == result["theta_nonzero"]
    assert result["adapter_vs_base"] > 1e-2  # the trained adapter changes the output ...
    assert result["merged_vs_adapter"] < 1e-4  # ... and the merged model reproduces it
    assert result["reloaded_vs_adapter"] == 0.0  # the saved adapter reloads exactly
