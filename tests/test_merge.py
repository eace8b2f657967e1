"""NeuroAda's streaming merge (``neuroada-plugin merge``): against PEFT's in-memory merge, and NeuroAda's bad inputs.

References are independent of the code under test: PEFT's ``merge_and_unload()`` (through the
NeuroAda layer), and a from-scratch ``W[i, idx] += theta`` in float64/float32 rounded once. The
engine's method-agnostic behaviour (files, output, signals, CLI) is tested with a toy method in
``test_merge_engine.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import AdapterCheckpointError, MergeError, NeuroAdaConfig
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.merge import merge_adapter_checkpoint
from neuroada_plugin.merge.cli import main as cli_main

from tiny_models import tiny_llama

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=1000)


def _merge(base, adapter, out, **kwargs):
    return merge_adapter_checkpoint(base, adapter, out, progress=False, log=None, **kwargs)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    if "lm_head.weight" in want and "lm_head.weight" not in got:  # tied: the checkpoint stores the embedding only
        assert torch.equal(want.pop("lm_head.weight"), want["model.embed_tokens.weight"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(_bits(got[name]), _bits(want[name])), name


def _peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _make(
    root: Path, *, dtype=torch.float32, top_k=4, shard=None, seed=0, targets=None, **overrides
) -> tuple[Path, Path]:
    """Save a tiny base (optionally sharded) and a NeuroAda adapter with random (non-zero) theta."""
    base, adapter = root / "base", root / "adapter"
    tiny_llama(seed=seed, dtype=dtype, **SMALL, **overrides).save_pretrained(
        base, **({"max_shard_size": shard} if shard else {})
    )
    config = NeuroAdaConfig(top_k=top_k, init_weights=False, seed=seed, target_modules=targets)
    get_peft_model(tiny_llama(seed=seed, dtype=dtype, **SMALL, **overrides), config).save_pretrained(adapter)
    return base, adapter


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16, shard="120KB")


@pytest.fixture(scope="module")
def fp32_single(tmp_path_factory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("fp32"))


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.neuroada-merge-*")), "staging folder left behind"


# ----------------------------------------------------------------------------- exactness


def test_bf16_sharded_merge_is_bit_identical_to_in_memory_merge(bf16_sharded, tmp_path):
    base, adapter = bf16_sharded
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    report = _merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"

    got = _all_tensors(out)
    _assert_bitwise_equal(got, _peft_merge(base, adapter))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    # Same shard layout and index; config and generation config copied unchanged.
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert report.patched_tensors == 14 and report.shards == len(shards)

    # Independent reference: W[i, idx] += theta in float32, rounded once to bf16; nothing else changes.
    base_t, adapter_t = _all_tensors(base), load_file(adapter / "adapter_model.safetensors")
    changed = 0
    for name, weight in base_t.items():
        module = name.removesuffix(".weight")
        theta = adapter_t.get(f"base_model.model.{module}.neuroada_theta")
        if theta is None:
            assert torch.equal(_bits(got[name]), _bits(weight)), name
            continue
        idx = adapter_t[f"base_model.model.{module}.neuroada_indices"]
        expected = weight.float()
        expected.scatter_(1, idx, expected.gather(1, idx) + theta.float())
        assert torch.equal(_bits(got[name]), _bits(expected.to(torch.bfloat16))), name
        changed += int((got[name] != weight).sum())
    assert changed > 0


def test_merged_fp32_model_reproduces_unmerged_adapter_logits(fp32_single, tmp_path):
    base, adapter = fp32_single
    _merge(base, adapter, tmp_path / "out")
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        want = adapted(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits)


def test_smollm2_real_checkpoint(smollm2_dir, tmp_path):
    """The real 135M model (fp32, single file, tied embeddings, tokenizer + chat template)."""
    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    get_peft_model(model, NeuroAdaConfig(top_k=2, init_weights=False)).save_pretrained(adapter)
    del model
    report = _merge(smollm2_dir, adapter, tmp_path / "out")
    assert report.patched_tensors == 30 * 7 and report.tokenizer_from == "base"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
    ):
        assert (tmp_path / "out" / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    _assert_bitwise_equal(_all_tensors(tmp_path / "out"), _peft_merge(smollm2_dir, adapter))


def test_tied_lm_head_adapter_patches_the_stored_embedding(tmp_path):
    """lm_head tied to embed_tokens (only the embedding is stored): the patch must land there, as in memory."""
    base, adapter = _make(tmp_path, tie_word_embeddings=True, targets=["q_proj", "lm_head"], top_k=3)
    _merge(base, adapter, tmp_path / "out")
    got = _all_tensors(tmp_path / "out")
    assert "lm_head.weight" not in got
    _assert_bitwise_equal(got, _peft_merge(base, adapter))
    assert not torch.equal(got["model.embed_tokens.weight"], _all_tensors(base)["model.embed_tokens.weight"])


def test_adapter_key_variants_give_identical_output(fp32_single, tmp_path):
    """No ``base_model.model.`` prefix, an adapter-name suffix, and the legacy .bin file all merge the same."""
    base, adapter = fp32_single
    _merge(base, adapter, tmp_path / "canonical")
    canonical = _all_tensors(tmp_path / "canonical")
    tensors = load_file(adapter / "adapter_model.safetensors")
    variants = {
        "noprefix": {k.removeprefix("base_model.model."): v for k, v in tensors.items()},
        "named": {f"{k}.default": v for k, v in tensors.items()},
    }
    for name, state in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(adapter / "adapter_config.json", folder)
        save_file(state, folder / "adapter_model.safetensors")
    bin_folder = tmp_path / "legacy_bin"
    bin_folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", bin_folder)
    torch.save(tensors, bin_folder / "adapter_model.bin")
    for name in [*variants, "legacy_bin"]:
        _merge(base, tmp_path / name, tmp_path / f"out-{name}")
        _assert_bitwise_equal(_all_tensors(tmp_path / f"out-{name}"), canonical)


def test_trl_sft_trainer_adapter(tiny_llama_dir, tmp_path):
    """An adapter written by TRL's SFTTrainer (tokenizer saved beside it) merges and is preferred for the tokenizer."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = Dataset.from_list([{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(8)])
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        max_length=32,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=NeuroAdaConfig(top_k=2)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "trl"))
    assert json.loads((tmp_path / "trl" / "adapter_config.json").read_text())["peft_type"] == "NEUROADA"
    theta = [v for k, v in load_file(tmp_path / "trl" / "adapter_model.safetensors").items() if k.endswith("theta")]
    assert any(bool(t.abs().sum() > 0) for t in theta), "training did not change theta"

    report = _merge(tiny_llama_dir, tmp_path / "trl", tmp_path / "out")
    assert report.tokenizer_from == "adapter"
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    _assert_bitwise_equal(_all_tensors(tmp_path / "out"), _peft_merge(tiny_llama_dir, tmp_path / "trl"))


# ----------------------------------------------------------------------------- bad input


def _cli(*args: str, capsys) -> tuple[int, str]:
    code = cli_main(["--no-progress", *args])
    return code, " ".join(capsys.readouterr().err.split())  # the CLI wraps long messages


def test_mismatched_base_is_refused_with_both_shapes(fp32_single, tmp_path, capsys):
    _, adapter = fp32_single
    other = tmp_path / "other-base"
    tiny_llama(seed=0, intermediate_size=96, **SMALL).save_pretrained(other)
    out = tmp_path / "out"
    code, err = _cli("--base", str(other), "--adapter", str(adapter), "--output", str(out), capsys=capsys)
    assert code == 2
    assert "does not fit" in err and "model.layers.0.mlp.down_proj" in err
    assert "[64, 96]" in err and "[64, 4]" in err
    _no_leftovers(out)


def test_adapter_for_a_deeper_model_names_the_missing_tensor(tmp_path, capsys):
    base, _ = _make(tmp_path / "shallow", num_hidden_layers=1)
    _, adapter = _make(tmp_path / "deep", num_hidden_layers=2)
    out = tmp_path / "out"
    code, err = _cli("--base", str(base), "--adapter", str(adapter), "--output", str(out), capsys=capsys)
    assert code == 2 and "model.layers.1." in err and "does not contain" in err
    _no_leftovers(out)


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_broken_neuroada_adapter_files(fp32_single, tmp_path):
    base, adapter = fp32_single
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.neuroada_indices"))
    cases = {
        "float-indices": ({**tensors, key: tensors[key].float()}, "must be integers"),
        "out-of-range": (
            {**tensors, key: tensors[key] + 64},
            r"q_proj: theta/indices have shape \[64, 4\] and their connection indices span \[\d+, \d+\]",
        ),
        "negative": ({**tensors, key: tensors[key] - 64}, r"span \[-\d+, "),
        "duplicate": ({**tensors, key: torch.zeros_like(tensors[key])}, "repeats an input index within row 0"),
        "theta-int": ({**tensors, key.replace("indices", "theta"): tensors[key].clone()}, "theta must be float"),
        "theta-shape": (
            {**tensors, key.replace("indices", "theta"): torch.ones(64, 3)},
            r"'model.layers.0.self_attn.q_proj.neuroada_theta' has shape \[64, 3\], expected \[64, 4\]",
        ),
        "extra-param": ({**tensors, key.replace("indices", "scale"): torch.ones(3)}, "unexpected NeuroAda tensor"),
        "theta-missing": (
            {k: v for k, v in tensors.items() if k != key.replace("indices", "theta")},
            "no 'neuroada_theta'",
        ),
    }
    for name, (state, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(adapter / "adapter_config.json", folder)
        save_file(state, folder / "adapter_model.safetensors")
        with pytest.raises(AdapterCheckpointError, match=message):
            _merge(base, folder, tmp_path / "out")
        _no_leftovers(tmp_path / "out")


def test_non_finite_merge_writes_nothing(fp32_single, tmp_path):
    base, adapter = fp32_single
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("v_proj.neuroada_theta"))
    tensors[key][3, 1] = float("inf")
    broken = _copy(adapter, tmp_path / "inf")
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"v_proj.neuroada_theta' holds 1 non-finite value"):
        _merge(base, broken, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_merge_overflowing_a_half_precision_weight_writes_nothing(tmp_path):
    """Finite theta whose sum overflows float16: the shared checked merge refuses it, as in memory."""
    base, adapter = _make(tmp_path, dtype=torch.float16, top_k=1, targets=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.q_proj.neuroada_theta"))
    tensors[key][0, 0] = 1e6  # beyond float16's max (65504)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"layers\.1\.self_attn\.q_proj.*1 non-finite value.*torch\.float16"):
        _merge(base, adapter, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_cli_help_and_verify(fp32_single, tmp_path, capsys):
    """``python -m neuroada_plugin.merge`` (the alias) with --verify, then ``neuroada-plugin verify`` on its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run(
        [sys.executable, "-m", "neuroada_plugin.merge", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0
    for flag in (
        "--base",
        "--adapter",
        "--output",
        "--force",
        "--verify",
        "--tokenizer",
        "--no-progress",
        "exit codes",
    ):
        assert flag in shown.stdout
    assert "neuroada (peft_type NEUROADA)" in shown.stdout
    base, adapter = fp32_single
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "neuroada_plugin.merge.cli", "--base", str(base), "--adapter", str(adapter),
         "--output", str(out), "--verify", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "merged neuroada adapter (NEUROADA)" in result.stdout and "bit-identical" in result.stdout
    assert "[verify] ok" in result.stderr

    # The standalone check: passes on the merge, fails (exit 1) on a tampered copy, exit 2 on bad input.
    assert plugin_main(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(out), "-q"]) == 0
    assert "weights bit-identical" in capsys.readouterr().out
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    tensors = load_file(tampered / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    assert plugin_main(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(tampered), "-q"]) == 1
    err = capsys.readouterr().err
    assert "neuroada-plugin verify: error:" in err and "model.layers.1.mlp.up_proj.weight" in err
    assert plugin_main(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(tmp_path / "x")]) == 2


def test_verify_catches_a_wrong_merge_and_writes_nothing(fp32_single, tmp_path, monkeypatch):
    """A merge rule that adds 2*theta must be caught by --verify (independent in-memory merge), leaving no output."""
    from neuroada_plugin.merge.verify import VerificationError
    from neuroada_plugin.neuroada import checkpoint

    base, adapter = fp32_single
    monkeypatch.setattr(checkpoint, "merge_values", lambda original, theta, **kwargs: original + 2 * theta)
    with pytest.raises(VerificationError, match="other values than PEFT's in-memory merge in float32"):
        _merge(base, adapter, tmp_path / "out", verify=True)
    _no_leftovers(tmp_path / "out")
