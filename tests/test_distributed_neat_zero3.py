"""NEAT under DeepSpeed ZeRO-3 on 2 CPU processes (gloo, DS_ACCELERATOR=cpu), against one process.

The worker (tests/distributed/neat_zero3_worker.py) loads the base partitioned, creates NEAT (depth 1,
random B: every tensor gets a gradient from step 1, A's needs the whole W0 in backward), trains 3
DeepSpeed engine steps on each rank's half of the global batch, saves the adapter the way the Trainer
does under ZeRO-3, then merges and unmerges under ZeRO-3. References: one process on the whole batch
(same seed before the adapter is created), PEFT loading of the saved folder, and the dense formula.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.distributed.common import (
    LR,
    STEPS,
    assert_theta_close,
    launch,
    make_data,
    neat_config,
    neat_of,
    save_base,
)


def _one_process(base, data) -> tuple[torch.nn.Module, dict, list[float]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, neat_config())
    initial = neat_of(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        loss = model(input_ids=data[step], labels=data[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, initial, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("neat_zero3")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("neat_zero3_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"), timeout=400)
    model, initial, losses = _one_process(base, data)
    return {
        "out": out,
        "base": base,
        "data": data,
        "result": result,
        "model": model,
        "initial": initial,
        "losses": losses,
    }


def _saved_neat(runs) -> dict[str, torch.Tensor]:
    saved = load_file(runs["out"] / "adapter" / "adapter_model.safetensors")
    out = {}
    for key, value in saved.items():
        module, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
        if leaf.startswith("neat_"):
            out[f"{module}.{leaf}.default"] = value
    return out


def test_fingerprints_are_those_of_the_whole_weights(runs):
    """Recorded at creation from W0 gathered under ZeRO-3: equal to one process's, so the adapter loads anywhere."""
    saved = {k: v for k, v in _saved_neat(runs).items() if ".neat_fingerprint." in k}
    reference = {
        f"{name.removeprefix('base_model.model.')}.neat_fingerprint.default": module.neat_fingerprint["default"]
        for name, module in runs["model"].named_modules()
        if hasattr(module, "neat_fingerprint") and "default" in module.neat_fingerprint
    }
    assert saved.keys() == reference.keys() and len(saved) == 12
    for key, value in saved.items():
        assert torch.equal(value, reference[key]), key


def _state_value(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``model.layers.0.mlp.up_proj.weight`` in a PeftModel state dict (where an adapted layer's weight is
    ``base_model.model.<module>.base_layer.weight``)."""
    module, _, leaf = key.rpartition(".")
    for candidate in (f"base_model.model.{key}", f"base_model.model.{module}.base_layer.{leaf}", key):
        if candidate in state:
            return state[candidate]
    raise KeyError(key)


def test_the_weights_and_the_adapter_were_partitioned(runs):
    for rank in ("rank0", "rank1"):
        assert runs["result"][rank]["partitioned"] and runs["result"][rank]["neat_partitioned"]


def test_the_adapter_starts_from_the_one_process_values(runs):
    initial = torch.load(runs["out"] / "initial.pt")
    assert initial.keys() == runs["initial"].keys() and len(initial) == 12 * 4
    for key, value in initial.items():
        assert torch.equal(value, runs["initial"][key]), key


def test_saved_adapter_is_complete_and_equals_one_process(runs):
    reference = neat_of(runs["model"])
    saved = {k: v for k, v in _saved_neat(runs).items() if ".neat_fingerprint." not in k}
    assert saved.keys() == reference.keys()
    for key, value in saved.items():
        assert not torch.equal(value, runs["initial"][key]), f"{key} did not train"
    assert_theta_close(saved, reference)
    losses = [runs["result"][r]["losses"] for r in ("rank0", "rank1")]
    assert [(a + b) / 2 for a, b in zip(*losses, strict=True)] == pytest.approx(runs["losses"], rel=1e-5)


def test_reloaded_adapter_gives_the_zero3_logits(runs):
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs["base"], dtype=torch.float32), runs["out"] / "adapter"
    ).eval()
    with torch.no_grad():
        logits = loaded(input_ids=runs["data"][0]).logits
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(runs["out"] / f"logits_rank{rank}.pt"), logits, rtol=1e-5, atol=1e-5)


def test_merge_under_zero3_is_the_dense_formula_and_unmerge_restores_every_weight(runs):
    merge = torch.load(runs["out"] / "merge.pt")
    base = load_file(runs["base"] / "model.safetensors")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs["base"], dtype=torch.float32), runs["out"] / "adapter"
    )
    deltas = {}
    for name, module in loaded.named_modules():
        if hasattr(module, "neat_A") and "default" in module.neat_A:
            deltas[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight("default")
    assert len(deltas) == 12
    for key, value in base.items():
        assert torch.equal(_state_value(merge["restored"], key), value), f"{key} not restored bit for bit"
    for key, delta in deltas.items():
        merged = _state_value(merge["merged"], key)
        torch.testing.assert_close(merged, base[key] + delta, rtol=0, atol=1e-6)
        assert not torch.equal(merged, base[key]), f"{key}: nothing merged"
    for rank in (0, 1):
        logits = torch.load(runs["out"] / f"merge_logits_rank{rank}.pt")
        torch.testing.assert_close(
            logits["merged"], torch.load(runs["out"] / f"logits_rank{rank}.pt"), rtol=1e-4, atol=1e-4
        )
